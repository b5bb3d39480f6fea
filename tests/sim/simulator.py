"""A deterministic, seeded simulation of a Raft cluster under faults.

Everything random comes from one `random.Random(seed)`, so a seed replays
exactly. Nodes run the real RawNode protocol on a MemoryStorage that plays the
disk: a crash throws away the RawNode and any Ready not yet persisted. The
network delays, drops, duplicates and reorders messages and is partitioned in
the shapes Jepsen uses. The checks in invariants.py run after every event.

In "membership" worlds (about half of them) clients also change the member
set one server at a time, as an operator would: add a learner (a new node
starts), promote it, add a voter, remove a voter or a learner, sometimes
forced past the strict reconfiguration check, down to one voter and up to
twice the initial size. A removed node keeps running (it may not know), and
its id is never reused.
"""
from __future__ import annotations

import heapq
import random
import struct
import zlib
from collections import deque

from kvstore.raft import (
    ConfChange, ConfState, Config, EntryType, MemoryStorage, Message, MessageType, ProposalDropped, RawNode, Ready,
    StateRole, decode_conf_change,
)

from kvstore.raft.confchange import conf_state_after

from .invariants import Checker, Violation

TICK = 10  # time units per tick: message delays are fractions of a tick
_SNAP = struct.Struct(">QI")

# event kinds
TICK_EV, DELIVER, PERSIST, CLIENT, FAULT, RESTART, SNAP_REPORT = range(7)


class Params:
    """Per-seed knobs, themselves drawn from the seed (so every seed is a different world)."""

    def __init__(self, rng: random.Random, nodes: int, chaos_ticks: int, churn: bool) -> None:
        self.nodes = nodes
        self.chaos_ticks = chaos_ticks
        self.liveness_ticks = 300
        self.pre_vote = rng.random() < 0.7
        self.check_quorum = rng.random() < 0.7
        self.election_tick = 10
        self.heartbeat_tick = rng.choice((1, 1, 2, 3))
        self.max_size_per_msg = rng.choice((1, 60, 1 << 20))  # 1 => one entry per append
        self.max_inflight = rng.choice((2, 4, 256))
        self.p_drop = rng.choice((0.0, 0.02, 0.1, 0.25))
        self.p_dup = rng.choice((0.0, 0.02, 0.1))
        self.max_delay = rng.choice((3, 10, 25))  # units; TICK = 10
        self.p_async = rng.choice((0.0, 0.3, 0.8))  # persist later, while still stepping
        self.p_crash_fsync = rng.choice((0.0, 0.02, 0.08))
        self.fault_every = rng.choice((2, 5, 12))  # ticks between fault events
        self.client_rate = rng.choice((0.3, 1.0, 3.0))  # client ops per tick
        self.snapshot_every = rng.choice((5, 20, 10_000))  # applied entries between compactions
        # one world in four is "leader churn": leaders are isolated or killed every tick or two while
        # clients keep writing to them, and appends carry one entry, so logs diverge in many terms
        # (the Figure 8 shapes of the Raft paper)
        self.churn = churn
        self.membership = not churn and rng.random() < 0.5
        self.p_conf_change = rng.choice((0.05, 0.15))  # of client ops, in membership worlds
        if churn:
            self.max_size_per_msg = 1
            self.fault_every = 1.5
            self.client_rate = 3.0
            self.p_drop = min(self.p_drop, 0.02)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in vars(self).items())


class SimNode:
    __slots__ = ("id", "storage", "node", "pending", "sm_index", "sm_hash", "sm_conf", "rand")

    def __init__(self, id: int, conf: ConfState) -> None:
        self.id = id
        self.storage = MemoryStorage()
        self.node: RawNode | None = None
        self.pending: Ready | None = None
        self.sm_index = 0  # the state machine is durable with its applied index (like LMDB)
        self.sm_hash = 0
        self.sm_conf = conf  # ... and with the membership as of that index


class Simulation:
    def __init__(self, seed: int, nodes: int | None = None, bugs: frozenset[str] = frozenset(),
                 chaos_ticks: int = 120, trace: bool = False) -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        churn = seed % 4 == 3
        n = nodes if nodes is not None else (3 if churn else (3, 5, 7)[seed % 3])
        self.p = Params(rng, n, chaos_ticks, churn)
        self.bugs = frozenset(bugs)
        self.ids = list(range(1, n + 1))  # every node ever started; membership worlds add more
        self.initial = ConfState(voters=list(self.ids))
        self.max_id = 2 * n  # membership worlds start new nodes up to this id
        self.nodes = {i: SimNode(i, self.initial) for i in self.ids}
        self.blocked: set[tuple[int, int]] = set()
        self.now = 0
        self.events: list = []
        self.seq = 0
        self.steps = 0
        self.trace = trace
        self.history: deque = deque(maxlen=400)
        self.checker = Checker(self)
        self.read_ctr = 0
        self.prop_ctr = 0
        self.healed = False
        self.live_data: bytes | None = None
        self.live_proposed_at = -1
        self.live_applied: dict[bytes, set[int]] = {}
        self.live_done = False
        self.conf_changes_applied: dict[int, int] = {}  # ConfChange type -> how many applies (all nodes)
        for i in self.ids:
            self.start(i)
            self.push(rng.randrange(TICK), TICK_EV, i)
        self.push(rng.randrange(TICK), CLIENT, None)
        self.push(self.p.fault_every * TICK, FAULT, None)

    # -- plumbing ------------------------------------------------------------------------------

    def push(self, delay: int, kind: int, a, b=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (self.now + delay, self.seq, kind, a, b))

    def log(self, *what) -> None:
        rec = (self.now,) + what
        self.history.append(rec)
        if self.trace:
            print(format_record(rec))

    def config(self, i: int, applied: int) -> Config:
        p = self.p
        sn = self.nodes[i]
        return Config(id=i, peers=list(self.initial.voters), election_tick=p.election_tick,
                      heartbeat_tick=p.heartbeat_tick, max_size_per_msg=p.max_size_per_msg,
                      max_inflight_msgs=p.max_inflight, pre_vote=p.pre_vote, check_quorum=p.check_quorum,
                      applied=applied, conf_state=sn.sm_conf, max_learner_lag=p.max_inflight,
                      rand=random.Random(self.rng.getrandbits(64)), testing_bugs=self.bugs)

    def start(self, i: int) -> None:
        sn = self.nodes[i]
        sn.node = RawNode(self.config(i, sn.sm_index), sn.storage)
        sn.pending = None
        self.checker.node_started(i)

    def crash(self, i: int, why: str) -> None:
        sn = self.nodes[i]
        if sn.node is None:
            return
        self.log("crash", i, why)
        sn.node = None
        sn.pending = None  # an unpersisted Ready is simply lost
        self.checker.node_crashed(i)
        if not self.healed:
            # often a quick restart (a supervisor), sometimes a long outage
            fast = self.rng.random() < 0.5
            self.push(self.rng.randint(1, 2 * TICK) if fast else self.rng.randint(2, 30) * TICK, RESTART, i)

    def send(self, m: Message) -> None:
        rng = self.rng
        p = self.p
        if p.p_drop and rng.random() < p.p_drop:
            if m.type == MessageType.SNAPSHOT:  # the transport tells the leader the stream failed
                self.push(rng.randint(1, p.max_delay), SNAP_REPORT, m.frm, (m.to, False))
            return
        self.push(rng.randint(1, p.max_delay), DELIVER, m)
        if p.p_dup and rng.random() < p.p_dup:
            self.push(rng.randint(1, p.max_delay * 2), DELIVER, m)

    # -- the node loop -------------------------------------------------------------------------

    def pump(self, i: int) -> None:
        """Drive node i's Ready loop as far as it goes right now."""
        sn = self.nodes[i]
        while sn.node is not None and sn.pending is None and sn.node.has_ready():
            rd = sn.node.ready()
            self.checker.on_ready(i, rd)
            for m in rd.messages:
                self.send(m)
            if self.p.p_async and self.rng.random() < self.p.p_async:
                sn.pending = rd  # the fsync runs while the node keeps stepping
                self.push(self.rng.randint(1, 15), PERSIST, i, rd)
                return
            self.persist(i, rd)

    def persist(self, i: int, rd: Ready) -> None:
        sn = self.nodes[i]
        if self.p.p_crash_fsync and not self.healed and self.rng.random() < self.p.p_crash_fsync:
            self.crash(i, "during fsync")
            return
        st = sn.storage
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
            idx, h = _SNAP.unpack(rd.snapshot.data)
            self.checker.on_snapshot_installed(i, idx, h)
            sn.sm_index, sn.sm_hash = idx, h
            sn.sm_conf = rd.snapshot.metadata.conf_state
            self.checker.conf_changed(i, snapshot=True)
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        for m in rd.persisted_messages:
            self.send(m)
        if rd.committed_entries:
            self.apply(sn, rd.committed_entries)
        sn.pending = None
        sn.node.advance(rd)
        self.checker.after_step(i)

    def apply(self, sn: SimNode, ents) -> None:
        h = sn.sm_hash
        chk = self.checker
        live = self.live_applied
        for e in ents:
            if e.index != sn.sm_index + 1:
                raise Violation(f"node {sn.id} applies {e.index} after {sn.sm_index}")
            h = zlib.crc32(e.data, zlib.crc32(b"%d:%d;" % (e.index, e.term), h))
            sn.sm_index = e.index
            chk.on_apply(sn.id, e.index, h)
            if e.type == EntryType.CONF_CHANGE:  # as the node's apply pipeline dispatches it
                cc = decode_conf_change(e.data)
                sn.node.apply_conf_change(cc)
                sn.sm_conf = conf_state_after(sn.sm_conf, cc)
                self.conf_changes_applied[cc.change_type] = self.conf_changes_applied.get(cc.change_type, 0) + 1
                self.log("conf", sn.id, e.index, sn.sm_conf.voters, sn.sm_conf.learners)
                chk.conf_changed(sn.id)
            elif e.data[:1] == b"L" and e.data in live:
                live[e.data].add(sn.id)
        sn.sm_hash = h
        if ents:
            sn.node.advance_apply_to(ents[-1].index)
        if sn.sm_index - sn.storage.snapshot().metadata.index >= self.p.snapshot_every:
            self.compact(sn)

    def compact(self, sn: SimNode) -> None:
        st = sn.storage
        idx = sn.sm_index
        if idx > st.last_index() or idx <= st.snapshot().metadata.index:
            return
        st.create_snapshot(idx, sn.node.conf_state(), _SNAP.pack(idx, sn.sm_hash))
        keep = self.rng.randrange(4)
        if idx - keep > st.first_index():
            st.compact(idx - keep)

    # -- events ------------------------------------------------------------------------------------

    def run(self) -> Simulation:
        p = self.p
        chaos_end = p.chaos_ticks * TICK
        end = chaos_end + p.liveness_ticks * TICK
        events = self.events
        nodes = self.nodes
        checker = self.checker
        pop = heapq.heappop
        try:
            while events:
                t, _, kind, a, b = pop(events)
                if not self.healed and t >= chaos_end:
                    self.now = chaos_end
                    self.heal_all()
                    heapq.heappush(events, (t, 0, kind, a, b))
                    continue
                if t > end:
                    break
                self.now = t
                self.steps += 1
                if kind == DELIVER:
                    sn = nodes[a.to]
                    if sn.node is None or (a.frm, a.to) in self.blocked:
                        if a.type == MessageType.SNAPSHOT:
                            self.snap_report(a.frm, a.to, False)
                        continue
                    if self.trace:
                        self.log("recv", a)
                    else:
                        self.history.append((t, "recv", a))
                    sn.node.step(a)
                    checker.after_step(a.to)
                    self.pump(a.to)
                    if a.type == MessageType.SNAPSHOT:
                        self.snap_report(a.frm, a.to, True)
                elif kind == TICK_EV:
                    sn = nodes[a]
                    self.push(TICK, TICK_EV, a)
                    if sn.node is not None:
                        sn.node.tick()
                        checker.after_step(a)
                        self.pump(a)
                elif kind == PERSIST:
                    sn = nodes[a]
                    if sn.node is not None and sn.pending is b:
                        self.log("persist", a)
                        self.persist(a, b)
                        self.pump(a)
                elif kind == CLIENT:
                    self.client()
                elif kind == FAULT:
                    self.fault()
                elif kind == SNAP_REPORT:
                    self.snap_report(a, b[0], b[1])
                elif kind == RESTART:
                    if nodes[a].node is None:
                        self.log("restart", a)
                        self.start(a)
                        self.pump(a)
                if self.live_done:
                    break
        except Violation as v:
            v.sim = self
            raise
        if not self.live_done:
            raise self.fail(Violation(
                f"liveness: no proposal committed on all nodes within {p.liveness_ticks} ticks after healing "
                f"(leaders: {[(i, n.node.raft.term) for i, n in nodes.items() if n.node and n.node.raft.state == StateRole.LEADER]})"))
        return self

    def fail(self, v: Violation) -> Violation:
        v.sim = self
        return v

    def snap_report(self, leader: int, to: int, ok: bool) -> None:
        node = self.nodes[leader].node
        if node is not None:
            self.log("snap-report", leader, to, ok)
            node.report_snapshot(to, ok)
            self.checker.after_step(leader)
            self.pump(leader)

    def leader(self) -> int:
        best, term = 0, -1
        for i, sn in self.nodes.items():
            if sn.node is not None and sn.node.raft.state == StateRole.LEADER and sn.node.raft.term > term:
                best, term = i, sn.node.raft.term
        return best

    def up(self) -> list[int]:
        return [i for i, sn in self.nodes.items() if sn.node is not None]

    def client(self) -> None:
        rng = self.rng
        self.push(max(1, int(rng.expovariate(self.p.client_rate) * TICK)), CLIENT, None)
        if self.healed:
            self.liveness_client()
            return
        up = self.up()
        if not up:
            return
        lead = self.leader()
        r = rng.random()
        # clients cache leaders: any node that believes it leads (even a deposed one) gets traffic
        leaders = [i for i in up if self.nodes[i].node.raft.state == StateRole.LEADER]
        target = rng.choice(leaders) if leaders and rng.random() < 0.8 else rng.choice(up)
        node = self.nodes[target].node
        try:
            if self.p.membership and r < self.p.p_conf_change:
                target = lead or target
                self.change_membership(target)
            elif r < 0.6:
                self.prop_ctr += 1
                data = b"P%d" % self.prop_ctr
                self.log("propose", target, data)
                node.propose(data)
            elif r < 0.95:
                self.read_ctr += 1
                ctx = b"R%d" % self.read_ctr
                self.checker.read_issued(ctx)
                self.log("read", target, ctx)
                node.read_index(ctx)
            elif lead:
                to = rng.choice(self.ids)
                self.log("transfer", lead, to)
                self.nodes[lead].node.transfer_leader(to)
                target = lead
        except ProposalDropped:
            pass
        self.checker.after_step(target)
        self.pump(target)

    def change_membership(self, lead: int) -> None:
        """One membership change at `lead`, as an operator would ask for it (may be refused)."""
        rng = self.rng
        node = self.nodes[lead].node
        cs = node.conf_state()
        r = rng.random()
        fresh = max(self.ids) + 1
        if r < 0.35 and fresh <= self.max_id:
            cc, joins = ConfChange(ConfChange.ADD_LEARNER, fresh), ConfState(cs.voters, cs.learners + [fresh])
        elif r < 0.55 and cs.learners:
            cc, joins = ConfChange(ConfChange.ADD_NODE, rng.choice(cs.learners)), None
        elif r < 0.65 and fresh <= self.max_id:
            cc, joins = ConfChange(ConfChange.ADD_NODE, fresh), ConfState(cs.voters + [fresh], cs.learners)
        else:
            members = cs.voters + cs.learners
            if len(cs.voters) == 1 and not cs.learners:
                return
            cc, joins = ConfChange(ConfChange.REMOVE_NODE, rng.choice(members)), None
        force = rng.random() < 0.2
        self.log("conf-propose", lead, cc.change_type, cc.node_id, "force" if force else "")
        node.propose_conf_change(cc, force=force)
        if joins is not None:  # the new node starts with the membership the change gives (etcd's
            self.ids.append(fresh)  # --initial-cluster-state existing)
            self.nodes[fresh] = SimNode(fresh, joins)
            self.start(fresh)
            self.push(self.rng.randrange(TICK), TICK_EV, fresh)

    def liveness_client(self) -> None:
        if self.live_data is not None:
            lead = self.leader()
            members = set(self.ids) if not lead else set(self.nodes[lead].node.conf_state().voters) | set(
                self.nodes[lead].node.conf_state().learners)
            if members <= self.live_applied[self.live_data]:
                self.live_done = True
                return
            if self.now - self.live_proposed_at < 3 * self.p.election_tick * TICK:
                return
        lead = self.leader()
        if not lead:
            return
        self.prop_ctr += 1
        data = b"L%d" % self.prop_ctr
        try:
            self.nodes[lead].node.propose(data)
        except ProposalDropped:
            return
        self.log("propose", lead, data)
        self.live_applied[data] = set()
        # any earlier live proposal that commits later also counts
        self.live_data = data
        self.live_proposed_at = self.now
        self.checker.after_step(lead)
        self.pump(lead)

    def fault(self) -> None:
        rng = self.rng
        self.push(max(1, int(rng.expovariate(1 / self.p.fault_every) * TICK)), FAULT, None)
        if self.healed:
            return
        ids = self.ids
        n = len(ids)
        r = rng.random()
        if self.p.churn:
            lead = self.leader()
            if r < 0.3 or not lead:
                self.blocked = set()
                self.log("heal")
            elif r < 0.8:
                self.partition([lead], [i for i in ids if i != lead], "isolate-leader")
            else:
                self.crash(lead, "kill leader")
            return
        if r < 0.25:
            self.blocked = set()
            self.log("heal")
        elif r < 0.40:
            k = rng.randrange(1, n)
            a = rng.sample(ids, k)
            self.partition(a, [i for i in ids if i not in a], "halves")
        elif r < 0.55:
            lead = self.leader() or rng.choice(ids)
            self.partition([lead], [i for i in ids if i != lead], "isolate-leader")
        elif r < 0.65:
            order = rng.sample(ids, n)
            reach = (n // 2 + 1) // 2
            blocked = set()
            for x in range(n):
                for y in range(n):
                    d = min(abs(x - y), n - abs(x - y))
                    if d > reach:
                        blocked.add((order[x], order[y]))
            self.blocked = blocked
            self.log("partition", "majority-ring", sorted(blocked))
        elif r < 0.75:
            order = rng.sample(ids, n)
            bridge, half = order[0], (n - 1) // 2
            self.partition(order[1 : 1 + half], order[1 + half :], f"bridge({bridge})")
        elif r < 0.95:
            up = self.up()
            if len(up) > 0:
                syncing = [i for i in up if self.nodes[i].pending is not None]
                x = rng.random()
                if syncing and x < 0.4:
                    self.crash(rng.choice(syncing), "kill during fsync")  # the widest window for lost promises
                else:
                    victim = self.leader() if x < 0.7 and self.leader() else rng.choice(up)
                    self.crash(victim, "kill")
        # else: nothing this time

    def partition(self, a, b, what: str) -> None:
        blocked = set()
        for x in a:
            for y in b:
                blocked.add((x, y))
                blocked.add((y, x))
        self.blocked = blocked
        self.log("partition", what, sorted(a), sorted(b))

    def heal_all(self) -> None:
        self.healed = True
        self.blocked = set()
        self.p.p_drop = 0.0
        self.p.p_dup = 0.0
        self.log("heal-all")
        for i, sn in self.nodes.items():
            if sn.node is None:
                self.log("restart", i)
                self.start(i)
                self.pump(i)


def format_record(rec) -> str:
    t, what, *rest = rec
    head = f"t={t / TICK:8.1f} {what:9s}"
    if what == "recv":
        m = rest[0]
        s = f"{m.frm}->{m.to} {m.type.name} term={m.term}"
        if m.type in (MessageType.APPEND, MessageType.APPEND_RESP, MessageType.VOTE, MessageType.PRE_VOTE,
                      MessageType.READ_INDEX_RESP):
            s += f" idx={m.index} logterm={m.log_term}"
        if m.entries:
            s += f" ents={[(e.index, e.term) for e in m.entries][:6]}"
        if m.commit:
            s += f" commit={m.commit}"
        if m.reject:
            s += f" REJECT hint={m.reject_hint}/{m.reject_hint_term}"
        if m.context:
            s += f" ctx={m.context!r}"
        if m.snapshot is not None:
            s += f" snap={m.snapshot.metadata.index}/{m.snapshot.metadata.term}"
        return head + s
    return head + " ".join(str(x) for x in rest)
