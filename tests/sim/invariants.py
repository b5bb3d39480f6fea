"""The safety properties of Raft, checked incrementally after every event.

Each check is amortised O(1) per event so the simulator can afford to run
them all the time:

- Election Safety: at most one leader per term.
- Log Matching: an (index, term) pair names one entry, with one predecessor
  term, everywhere it ever appears (checked on every entry a node persists).
- Leader Completeness: an entry committed in term T is in the log of every
  leader of a term > T (checked when a node becomes leader).
- State Machine Safety: nodes apply the same entries in the same order
  (a hash chain over applied entries, also used to validate snapshots);
  a committed index never changes its entry.
- Committed means safe: no node lacking the newest committed entry could
  collect votes from a quorum, judged by the up-to-date rule of §5.4.1 over
  every node's log (a crashed node's persisted one). This sees a commit
  that Leader Completeness would only catch after more bad luck.
- Linearizable reads: a ReadIndex answer is at least the highest index
  committed anywhere when the read was issued.
"""
from __future__ import annotations

from kvstore.raft import StateRole
from kvstore.raft.storage import CompactedError, UnavailableError


class Violation(AssertionError):
    sim = None


class Checker:
    def __init__(self, sim) -> None:
        self.sim = sim
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.seen_leader: set[tuple[int, int]] = set()
        self.commit_term: dict[int, int] = {}  # index -> term of the entry committed there
        self.commit_at: dict[int, int] = {}  # index -> term in which it was (first seen) committed
        self.max_committed = 0
        self.seen_commit: dict[int, int] = {}
        self.entries: dict[tuple[int, int], tuple[bytes, int | None]] = {}
        self.chain: dict[int, int] = {}
        self.read_issue: dict[bytes, int] = {}

    def fail(self, msg: str) -> Violation:
        v = Violation(msg)
        v.sim = self.sim
        return v

    def node_started(self, i: int) -> None:
        """A restarted member's commit index must name the entry committed there (reconcile's job)."""
        log = self.sim.nodes[i].node.raft.log
        c = log.committed
        want = self.commit_term.get(c)
        if want is not None and c >= log.first_index() - 1:
            have = log.term_or_zero(c)
            if have != want:
                raise self.fail(f"state machine safety: node {i} restarts with commit index {c} over an entry of "
                                f"term {have}, where term {want} was committed")
        self.seen_commit[i] = c

    def node_crashed(self, i: int) -> None:
        pass

    def after_step(self, i: int) -> None:
        node = self.sim.nodes[i].node
        if node is None:
            return
        r = node.raft
        if r.state == StateRole.LEADER and (i, r.term) not in self.seen_leader:
            self.new_leader(i, r)
        c = r.log.committed
        seen = self.seen_commit[i]
        if c > seen:
            self.record_commits(i, r, seen + 1, c)
            self.seen_commit[i] = c
        elif c < seen:
            raise self.fail(f"node {i}: commit index went back from {seen} to {c}")

    def new_leader(self, i: int, r) -> None:
        t = r.term
        other = self.leaders.get(t)
        if other is not None and other != i:
            raise self.fail(f"election safety: nodes {other} and {i} are both leader of term {t}")
        self.leaders[t] = i
        self.seen_leader.add((i, t))
        log = r.log
        first = log.first_index()
        last = log.last_index()
        for idx, cterm in self.commit_at.items():
            if cterm >= t or idx < first:
                continue
            want = self.commit_term[idx]
            have = log.term_or_zero(idx) if idx <= last else None
            if have != want:
                raise self.fail(f"leader completeness: leader {i} of term {t} has term {have} at index {idx}, "
                                f"but an entry of term {want} was committed there in term {cterm}")

    def record_commits(self, i: int, r, lo: int, hi: int) -> None:
        log = r.log
        lo = max(lo, log.first_index())
        if lo > hi:
            return
        try:
            ents = log.entries(lo, hi + 1)
        except (CompactedError, UnavailableError) as e:
            raise self.fail(f"node {i}: committed entries [{lo}, {hi}] unreadable: {e!r}") from e
        ct = self.commit_term
        for e in ents:
            have = ct.get(e.index)
            if have is None:
                ct[e.index] = e.term
                self.commit_at[e.index] = r.term
            elif have != e.term:
                raise self.fail(f"state machine safety: node {i} committed term {e.term} at index {e.index}, "
                                f"where term {have} was committed before")
        if hi > self.max_committed:
            self.max_committed = hi
            self.check_electable(hi, ct[hi] if hi in ct else None)

    def check_electable(self, k: int, term: int | None) -> None:
        if term is None:
            return
        sim = self.sim
        tips = {}
        has = {}
        for i, sn in sim.nodes.items():
            if sn.node is not None:
                log = sn.node.raft.log
                li = log.last_index()
                tips[i] = (log.term(li), li)
                has[i] = k < log.first_index() or (k <= li and log.term_or_zero(k) == term)
            else:
                st = sn.disk.wal
                li = st.last_index()
                tips[i] = (st.term(li), li)
                first = st.first_index()
                has[i] = k < first or (k <= li and st.term(k) == term)
        quorum = len(tips) // 2 + 1
        for n, tip in tips.items():
            if has[n]:
                continue
            voters = [v for v, vt in tips.items() if vt <= tip]  # (last term, last index) order = §5.4.1
            if len(voters) >= quorum:
                raise self.fail(f"committed entry {k} (term {term}) is not safe: node {n} lacks it yet could be "
                                f"elected by {sorted(voters)} (log tips {tips})")

    def on_ready(self, i: int, rd) -> None:
        if rd.entries:
            log = self.sim.nodes[i].node.raft.log
            first = rd.entries[0]
            try:
                prev = log.term(first.index - 1)
            except (CompactedError, UnavailableError):
                prev = None
            seen = self.entries
            for e in rd.entries:
                key = (e.index, e.term)
                have = seen.get(key)
                if have is None:
                    seen[key] = (e.data, prev)
                elif have[0] != e.data or (prev is not None and have[1] is not None and have[1] != prev):
                    raise self.fail(f"log matching: node {i} has entry {key} data={e.data!r} prev_term={prev}, "
                                    f"elsewhere data={have[0]!r} prev_term={have[1]}")
                prev = e.term
        if rd.read_states:
            for rs in rd.read_states:
                issued = self.read_issue.get(rs.ctx)
                if issued is not None and rs.index < issued:
                    raise self.fail(f"stale read: node {i} got read index {rs.index} for {rs.ctx!r}, but index "
                                    f"{issued} was committed before the read began")

    def read_issued(self, ctx: bytes) -> None:
        self.read_issue[ctx] = self.max_committed

    def on_apply(self, i: int, index: int, h: int) -> None:
        have = self.chain.get(index)
        if have is None:
            self.chain[index] = h
        elif have != h:
            raise self.fail(f"state machine safety: node {i} applied a different history at index {index}")

    def on_snapshot_installed(self, i: int, index: int, h: int) -> None:
        have = self.chain.get(index)
        if have is not None and have != h:
            raise self.fail(f"node {i} installed a snapshot at {index} that differs from the applied history")
