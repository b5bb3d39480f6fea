"""What the leader knows about each follower's log, and the flow control on it.

As in etcd: a follower is probed (one append per heartbeat until we find
where the logs match), then replicated to optimistically (pipelined appends
bounded by an in-flight window of messages and bytes), or waits for a
snapshot to be installed.
"""
from __future__ import annotations

import enum
from collections import deque

from .types import ConfState


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """Append messages sent but not yet acknowledged: (last index, bytes)."""

    __slots__ = ("_q", "_bytes", "cap", "max_bytes")

    def __init__(self, cap: int, max_bytes: int = 0) -> None:
        self._q: deque[tuple[int, int]] = deque()
        self._bytes = 0
        self.cap = cap
        self.max_bytes = max_bytes

    def add(self, index: int, size: int) -> None:
        self._q.append((index, size))
        self._bytes += size

    def free_le(self, index: int) -> None:
        q = self._q
        while q and q[0][0] <= index:
            self._bytes -= q.popleft()[1]

    def free_first_one(self) -> None:
        if self._q:
            self._bytes -= self._q.popleft()[1]

    def full(self) -> bool:
        return len(self._q) >= self.cap or (self.max_bytes > 0 and self._bytes >= self.max_bytes)

    def count(self) -> int:
        return len(self._q)

    def reset(self) -> None:
        self._q.clear()
        self._bytes = 0


class Progress:
    __slots__ = ("match", "next", "state", "pending_snapshot", "recent_active", "probe_sent", "inflights", "is_learner")

    def __init__(self, next_index: int, max_inflight: int, max_inflight_bytes: int = 0, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = False
        self.probe_sent = False  # PROBE: an append is out; wait for its answer or a heartbeat
        self.inflights = Inflights(max_inflight, max_inflight_bytes)
        self.is_learner = is_learner

    def __repr__(self) -> str:
        return f"Progress(match={self.match}, next={self.next}, state={self.state.name})"

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snap_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snap_index

    def sent_entries(self, last_index: int, n: int, size: int) -> None:
        """Account for an append carrying n entries ending at last_index."""
        if self.state == ProgressState.REPLICATE:
            if n:
                self.next = last_index + 1
                self.inflights.add(last_index, size)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def maybe_update(self, n: int) -> bool:
        """A follower acknowledged index n; False if the ack is stale."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        if self.next < n + 1:
            self.next = n + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A follower rejected an append at `rejected`; back `next` off (fast backtracking)."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale rejection
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # not the probe we are waiting for
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True


class VoteResult(enum.IntEnum):
    PENDING = 0
    LOST = 1
    WON = 2


class ProgressTracker:
    """Membership, replication progress and election votes."""

    def __init__(self, max_inflight: int, max_inflight_bytes: int = 0, bug_learner_in_quorum: bool = False) -> None:
        self.bug_learner_in_quorum = bug_learner_in_quorum  # planted bug (faults.LEARNER_IN_QUORUM)
        self.voters: list[int] = []
        self.learners: list[int] = []
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes

    def conf_state(self) -> ConfState:
        return ConfState(voters=sorted(self.voters), learners=sorted(self.learners))

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def add_node(self, id: int, next_index: int, learner: bool = False) -> None:
        if learner:
            if id in self.voters or id in self.learners:
                return
            self.learners.append(id)
        else:
            if id in self.learners:
                self.learners.remove(id)
            if id in self.voters:
                if id in self.progress:
                    self.progress[id].is_learner = False
                return
            self.voters.append(id)
        pr = self.progress.get(id)
        if pr is None:
            pr = Progress(next_index, self.max_inflight, self.max_inflight_bytes, learner)
            pr.recent_active = True  # give a new member an election timeout to show up
            self.progress[id] = pr
        pr.is_learner = learner

    def remove_node(self, id: int) -> None:
        if id in self.voters:
            self.voters.remove(id)
        if id in self.learners:
            self.learners.remove(id)
        self.progress.pop(id, None)
        self.votes.pop(id, None)

    def committed(self) -> int:
        """The largest index acknowledged by a quorum of voters (learners never count)."""
        counted = self.voters + self.learners if self.bug_learner_in_quorum else self.voters
        matches = sorted((self.progress[v].match for v in counted), reverse=True)
        if not matches:
            return 0
        return matches[self.quorum() - 1]

    def has_quorum(self, ids) -> bool:
        n = 0
        for v in self.voters:
            if v in ids:
                n += 1
        return n >= self.quorum()

    def quorum_active(self, self_id: int) -> bool:
        return self.active_voters(self_id) >= self.quorum()

    def active_voters(self, self_id: int, voters: list[int] | None = None) -> int:
        """How many of `voters` (default: the current ones) were heard from lately (self always counts)."""
        n = 0
        for v in self.voters if voters is None else voters:
            pr = self.progress.get(v)
            if v == self_id or (pr is not None and pr.recent_active):
                n += 1
        return n

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, id: int, granted: bool) -> None:
        if id not in self.votes:
            self.votes[id] = granted

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = rejected = 0
        for v in self.voters:
            r = self.votes.get(v)
            if r is True:
                granted += 1
            elif r is False:
                rejected += 1
        q = self.quorum()
        if granted >= q:
            return granted, rejected, VoteResult.WON
        if rejected > len(self.voters) - q:
            return granted, rejected, VoteResult.LOST
        return granted, rejected, VoteResult.PENDING
