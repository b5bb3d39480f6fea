"""A deterministic, seeded simulation of a Raft cluster under faults.

Everything random comes from one `random.Random(seed)`, so a seed replays
exactly. Each member runs the server's own code: the RawNode, the Ready
handler (kvstore/server/ready_handler.py) and the apply pipeline
(kvstore/server/apply_pipeline.py), driven here step by step as node.py's
asyncio shell drives them, and on restart the server's reconcile
(kvstore/storage/reconcile.py). Its storage is the model in disk.py: a crash
is a process kill or a power cut, inside a WAL write, between the steps of a
snapshot install, or between two Ready steps, and loses what that crash
would lose. The network delays, drops, duplicates and reorders messages and
is partitioned in the shapes Jepsen uses. The checks in invariants.py run
after every event, and disk.py's fakes check the durability rules as the
handler acts: nothing is applied before it is durable locally, nothing is
answered before it is durable on a majority.

In "membership" worlds (about half of the others) clients also change the
member set one server at a time, as an operator would: add a learner (a new
node starts), promote it, add a voter, remove a voter or a learner, sometimes
forced past the strict reconfiguration check, down to one voter and up to
twice the initial size. The apply pipeline's membership hook records each
change with the state machine (and its images), as the server's does. A
removed node keeps running (it may not know), and its id is never reused;
members that have applied its removal refuse its messages, as the peer
server does.
"""
from __future__ import annotations

import heapq
import random
from collections import Counter, deque

from kvstore.raft import ConfChange, Config, Message, MessageType, ProposalDropped, RawNode, StateRole
from kvstore.raft.confchange import conf_state_after
from kvstore.raft.types import ConfState, SnapshotMetadata
from kvstore.server.apply_pipeline import ApplyPipeline
from kvstore.server.ready_handler import ReadyHandler, Step
from kvstore.storage.reconcile import ReconcileError, reconcile
from kvstore.storage.storage_fault import StorageFault

from .disk import Crash, Disk, Faults
from .invariants import Checker, Violation

TICK = 10  # time units per tick: message delays are fractions of a tick
# event kinds
TICK_EV, DELIVER, PERSIST, CLIENT, FAULT, RESTART, SNAP_REPORT, APPLY = range(8)


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
        if churn:
            self.max_size_per_msg = 1
            self.fault_every = 1.5
            self.client_rate = 3.0
            self.p_drop = min(self.p_drop, 0.02)
        self.p_power = rng.choice((0.0, 0.5, 1.0))  # of crashes, the share that are power cuts
        self.p_crash_install = rng.choice((0.0, 0.05, 0.2))  # per step of a snapshot install
        self.p_fsync_error = rng.choice((0.0, 0.0, 0.005))  # per WAL write: the member must stop
        self.p_apply_lag = rng.choice((0.0, 0.3))  # committed entries applied later (the apply thread)
        self.membership = not churn and rng.random() < 0.5
        self.p_conf_change = rng.choice((0.05, 0.15))  # of client ops, in membership worlds

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in vars(self).items())


class SimNode:
    """One member: its disk survives crashes; the process (RawNode, handler, pipeline) does not."""

    __slots__ = ("id", "disk", "node", "handler", "pipeline", "steps", "pending", "apply_due")

    def __init__(self, id: int, faults: Faults, conf: ConfState) -> None:
        self.id = id
        self.disk = Disk(id, faults, conf)
        self.node: RawNode | None = None
        self.handler: ReadyHandler | None = None
        self.pipeline: ApplyPipeline | None = None
        self.steps = None  # the handler's steps for the Ready under way
        self.pending = None  # the PERSIST step waiting for its (simulated) fsync to finish
        self.apply_due = False  # an APPLY event is scheduled for the backlog


class SimEvents:
    """What the handler and the pipeline tell the member; the simulator checks the answers."""

    def __init__(self, sim: Simulation, id: int) -> None:
        self.sim, self.id = sim, id

    def on_hard_state(self, hs) -> None:
        pass

    def on_soft_state(self, leader_id: int, role) -> None:
        pass

    def on_read_state(self, index: int, ctx: bytes) -> None:
        pass  # checked on the Ready itself (Checker.on_ready)

    def on_fsync(self, took_s: float, entries: int) -> None:
        pass

    def answer(self, last_index: int, origins: list, results: list) -> None:
        sim = self.sim
        for origin in origins:
            if origin is not None and sim.proposer.get(origin[2]) == self.id:
                sim.check_answer(self.id, origin[0], origin[1])

    def applied(self, index: int) -> None:
        pass

    def on_conf_change(self, index: int, cc: ConfChange, conf_state: ConfState) -> None:
        """The membership hook: the state machine records the member set the change gives (node.py's
        state machine does it in the apply transaction; nothing can crash in between here)."""
        sim = self.sim
        sm = sim.nodes[self.id].disk.sm
        sim.conf_before[self.id] = sm.conf
        if cc.change_type == ConfChange.REMOVE_NODE:
            sim.removed_at[cc.node_id] = index
        sm.conf = conf_state_after(sm.conf, cc)
        sim.conf_changes_applied[cc.change_type] += 1
        sim.log("conf", self.id, index, sm.conf.voters, sm.conf.learners)
        sim.checker.conf_changed(self.id)


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
        self.conf_changes_applied: Counter[int] = Counter()  # ConfChange type -> applies (all nodes)
        self.conf_before: dict[int, ConfState] = {}  # node -> its member set before its last applied change
        # member -> index of the entry that removed it; a member that has applied it refuses the removed
        # member's messages, as the peer server does (else, with neither pre-vote nor check-quorum, a
        # removed member that never heard of its removal disrupts every election with a higher term)
        self.removed_at: dict[int, int] = {}
        p = self.p
        self.faults = Faults(rng, p.p_crash_fsync, p.p_crash_install, p.p_fsync_error, p.p_power)
        self.nodes = {i: SimNode(i, self.faults, self.initial) for i in self.ids}
        self.proposer: dict[bytes, int] = {}  # proposal data -> the member it was proposed to
        self.crashes: Counter[str] = Counter()  # where members died: a storage step, "fail-stop", "kill"
        self.repairs = 0  # restarts where reconcile had to finish an install or reinstall an image
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
        return Config(id=i, peers=list(self.initial.voters), election_tick=p.election_tick,
                      heartbeat_tick=p.heartbeat_tick, max_size_per_msg=p.max_size_per_msg,
                      max_inflight_msgs=p.max_inflight, pre_vote=p.pre_vote, check_quorum=p.check_quorum,
                      applied=applied, conf_state=self.nodes[i].disk.sm.conf, max_learner_lag=p.max_inflight,
                      rand=random.Random(self.rng.getrandbits(64)), testing_bugs=self.bugs)

    def start(self, i: int) -> None:
        """Start member i's process on its disk: reconcile (the server's), then the core and handler."""
        sn = self.nodes[i]
        disk = sn.disk
        before = (disk.sm.applied_index, disk.wal.first_index(), disk.wal.last_index())
        try:
            reconcile(disk.sm, disk.wal, disk.images, bugs=self.bugs)  # type: ignore[arg-type]
        except ReconcileError as e:
            raise self.fail(Violation(f"node {i} cannot restart: {e}")) from e
        except Crash as c:  # a crash again, in the middle of finishing the last one's work
            self.log("crash", i, f"in {c.point} while starting" + (" (power cut)" if c.power else ""))
            self.crashes[c.point] += 1
            if c.power:
                disk.sm.power_loss()
            self.push(self.rng.randint(1, 2 * TICK), RESTART, i)
            return
        if (disk.sm.applied_index, disk.wal.first_index(), disk.wal.last_index()) != before:
            self.repairs += 1
        disk.sm.on_apply = lambda index, term, data, h: self.on_apply(i, index, term, data, h)
        sn.node = raw = RawNode(self.config(i, disk.sm.applied_index), disk.wal)
        events = SimEvents(self, i)
        sn.handler = ReadyHandler(raw, disk.wal, disk.sm, disk.images, events, clock=lambda: self.now / TICK,
                                  bugs=self.bugs)
        sn.pipeline = ApplyPipeline(raw, disk.sm, events, events, waiting=lambda: True)
        sn.steps = sn.pending = None
        sn.apply_due = False
        self.checker.node_started(i)

    def crash(self, i: int, why: str, power: bool | None = None) -> None:
        sn = self.nodes[i]
        if sn.node is None:
            return
        if power is None:
            power = self.rng.random() < self.p.p_power
        self.log("crash", i, why + (" (power cut)" if power else ""))
        self.crashes[why.split(":")[0].removeprefix("in ")] += 1
        if power:
            self.crashes["power cut"] += 1
        sn.node = sn.handler = sn.pipeline = None
        sn.steps = sn.pending = None  # a Ready under way is simply lost, and the apply backlog with it
        # and its waiting clients: entries it applies again after the restart answer nobody
        self.proposer = {data: n for data, n in self.proposer.items() if n != i}
        if power:
            sn.disk.sm.power_loss()
        self.checker.node_crashed(i)
        if not self.healed:
            # often a quick restart (a supervisor), sometimes a long outage
            fast = self.rng.random() < 0.5
            self.push(self.rng.randint(1, 2 * TICK) if fast else self.rng.randint(2, 30) * TICK, RESTART, i)
        else:
            self.push(1, RESTART, i)

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
        while sn.node is not None and sn.steps is None and sn.node.has_ready():
            rd = sn.node.ready()
            self.checker.on_ready(i, rd)
            sn.steps = sn.handler.handle(rd)
            self.run_steps(i)

    def run_steps(self, i: int) -> None:
        """Carry out the handler's steps as node.py does, until they end, wait for an fsync, or crash."""
        sn = self.nodes[i]
        try:
            if sn.pending is not None:  # the fsync of a PERSIST step has come back
                write, sn.pending = sn.pending, None
                sn.handler.persist(write)
            for step, payload in sn.steps:
                if step is Step.SEND:
                    for m in payload:
                        self.send(m)
                elif step is Step.APPLY:
                    self.apply(i, payload)
                elif step is Step.PERSIST:
                    if self.p.p_async and self.rng.random() < self.p.p_async:
                        sn.pending = payload  # the fsync runs while the node keeps stepping
                        self.push(self.rng.randint(1, 15), PERSIST, i, payload)
                        return
                    sn.handler.persist(payload)
                else:
                    self.drain_apply(i)  # node.py: earlier entries first
                    sn.handler.install_snapshot(payload)
                    self.checker.on_snapshot_installed(i, sn.disk.sm.applied_index, sn.disk.sm.hash)
                    self.checker.conf_changed(i, snapshot=True)
        except Crash as c:
            self.crash(i, f"in {c.point}", power=c.power)
            return
        except StorageFault as e:  # fail-stop: the process exits; what the fsync lost stays lost
            self.crash(i, f"fail-stop: {e}", power=False)
            return
        sn.steps = None
        self.checker.after_step(i)
        self.maybe_checkpoint(i)

    def apply(self, i: int, entries) -> None:
        """An APPLY step: the pipeline applies now, or later as the apply thread would (node.py)."""
        sn = self.nodes[i]
        sn.pipeline.submit(entries)
        if self.p.p_apply_lag and not self.healed and self.rng.random() < self.p.p_apply_lag:
            if not sn.apply_due:
                sn.apply_due = True
                self.push(self.rng.randint(1, 2 * TICK), APPLY, i, sn.pipeline)
            return
        self.drain_apply(i)

    def drain_apply(self, i: int) -> None:
        pipeline = self.nodes[i].pipeline
        if pipeline.backlog:
            batch = pipeline.take()
            pipeline.run(batch)
            pipeline.finish(batch)

    def on_apply(self, i: int, index: int, term: int, data: bytes, h: int) -> None:
        """The state machine of member i applies an entry: it must be durable in i's own log."""
        if not self.nodes[i].disk.wal.holds(index, term):
            raise self.fail(Violation(f"node {i} applied entry {index} (term {term}) that is not durable in its "
                                      "own log"))
        self.checker.on_apply(i, index, h)
        live = self.live_applied.get(data)
        if live is not None:
            live.add(i)

    def check_answer(self, i: int, index: int, term: int) -> None:
        """Node i answers the client of entry (index, term): a majority must hold it durably."""
        # The config that committed it: the one in force now, or (a change applies after it commits, and
        # one at a time) the one before the last change.
        configs = [self.nodes[i].disk.sm.conf.voters, self.conf_before.get(i, self.initial).voters]
        holders = [n for n in self.nodes if self.nodes[n].disk.wal.holds(index, term)]
        if not any(len(set(holders) & set(c)) >= len(c) // 2 + 1 for c in configs):
            raise self.fail(Violation(f"answered before durable on a majority: node {i} answered entry {index} "
                                      f"(term {term}), durable only on nodes {holders}"))

    def maybe_checkpoint(self, i: int) -> None:
        """node.py's checkpoint: the state machine made the durable base, then the log compacted."""
        sn = self.nodes[i]
        disk = sn.disk
        wal = disk.wal
        if disk.sm.applied_index - wal.snapshot().metadata.index < self.p.snapshot_every:
            return
        index, term = disk.sm.checkpoint()
        if index > wal.last_index() or index <= wal.snapshot().metadata.index:
            return
        meta = SnapshotMetadata(index=index, term=term, conf_state=disk.sm.conf)
        wal.set_snapshot(meta, disk.sm.image())
        keep = self.rng.randrange(4)
        if index - keep > wal.first_index():
            wal.compact(index - keep)

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
                    if sn.node is None or (a.frm, a.to) in self.blocked or self.refuses(sn, a.frm):
                        if a.type == MessageType.SNAPSHOT:
                            self.snap_report(a.frm, a.to, False)
                        continue
                    if self.trace:
                        self.log("recv", a)
                    else:
                        self.history.append((t, "recv", a))
                    if a.type == MessageType.SNAPSHOT:  # the peer server publishes the image first
                        sn.disk.images.publish(a.snapshot.metadata, a.snapshot.data)
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
                        self.run_steps(a)
                        self.pump(a)
                elif kind == APPLY:
                    sn = nodes[a]
                    if sn.pipeline is b:
                        sn.apply_due = False
                        try:
                            self.drain_apply(a)
                        except Crash as c:
                            self.crash(a, f"in {c.point}", power=c.power)
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

    def refuses(self, sn: SimNode, frm: int) -> bool:
        """Whether member sn has applied frm's removal (peer_server.py refuses a removed member)."""
        at = self.removed_at.get(frm)
        return at is not None and sn.disk.sm.applied_index >= at

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
                self.proposer[data] = target
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
            if len(cs.voters) == 1 and not cs.learners:
                return
            cc, joins = ConfChange(ConfChange.REMOVE_NODE, rng.choice(cs.voters + cs.learners)), None
        force = rng.random() < 0.2
        self.log("conf-propose", lead, cc.change_type, cc.node_id, "force" if force else "")
        node.propose_conf_change(cc, force=force)
        if joins is not None:  # the new node starts with the membership the change gives (etcd's
            self.ids.append(fresh)  # --initial-cluster-state existing)
            self.nodes[fresh] = SimNode(fresh, self.faults, joins)
            self.start(fresh)
            self.push(self.rng.randrange(TICK), TICK_EV, fresh)

    def liveness_client(self) -> None:
        if self.live_data is not None:
            lead = self.leader()
            cs = self.nodes[lead].node.conf_state() if lead else ConfState(list(self.ids))
            if set(cs.voters) | set(cs.learners) <= self.live_applied[self.live_data]:
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
            self.proposer[data] = lead
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
        self.faults.enabled = False
        for i in self.ids:
            if self.nodes[i].pipeline is not None:
                self.drain_apply(i)
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
