"""The node's view of its log: durable entries in Storage plus an unstable tail.

Like etcd's raftLog. Entries the core has accepted but the node loop has not
yet made durable live in `unstable` (starting at `offset`); indexes >= offset
are always read from there, so a stale suffix still sitting in storage (from
a Ready persisted after the tail was overwritten) is never consulted.
`offset - 1` is therefore the last index known to be durable and consistent.
"""
from __future__ import annotations

from .storage import CompactedError, Storage, UnavailableError
from .types import Entry, Snapshot
from .util import limit_size


class RaftLog:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable: list[Entry] = []
        self.offset = last + 1
        self.unstable_snapshot: Snapshot | None = None
        self.committed = first - 1
        self.applying = first - 1  # highest index handed out in Ready.committed_entries
        self.applied = first - 1

    def __repr__(self) -> str:
        return (f"RaftLog(committed={self.committed}, applied={self.applied}, offset={self.offset}, "
                f"unstable={len(self.unstable)}, last={self.last_index()})")

    # -- indexes and terms ------------------------------------------------------

    def first_index(self) -> int:
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.metadata.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        if self.unstable:
            return self.offset + len(self.unstable) - 1
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.metadata.index
        return self.offset - 1 if self.offset - 1 <= self.storage.last_index() else self.storage.last_index()

    def stable_last(self) -> int:
        """The last index that is durable and consistent with this log."""
        return self.offset - 1

    def term(self, i: int) -> int:
        """Term at i; raises CompactedError / UnavailableError outside the log."""
        if i >= self.offset:
            k = i - self.offset
            if k < len(self.unstable):
                return self.unstable[k].term
            raise UnavailableError(i)
        snap = self.unstable_snapshot
        if snap is not None:
            if i == snap.metadata.index:
                return snap.metadata.term
            raise CompactedError(i)
        return self.storage.term(i)

    def term_or_zero(self, i: int) -> int:
        try:
            return self.term(i)
        except (CompactedError, UnavailableError):
            return 0

    def match_term(self, i: int, t: int) -> bool:
        try:
            return self.term(i) == t
        except (CompactedError, UnavailableError):
            return False

    def last_term(self) -> int:
        return self.term(self.last_index())

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """§5.4.1: the candidate's log is at least as up-to-date as ours."""
        lt = self.last_term()
        return term > lt or (term == lt and last_index >= self.last_index())

    # -- reading entries ----------------------------------------------------------

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi), bounded by max_bytes but at least one."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        off = self.offset
        if hi <= off:
            return self.storage.entries(lo, hi, max_bytes)
        if lo >= off:
            return limit_size(self.unstable[lo - off : hi - off], max_bytes)
        stored = self.storage.entries(lo, off, max_bytes)
        if len(stored) < off - lo:
            return stored
        return limit_size(stored + self.unstable[: hi - off], max_bytes)

    def snapshot(self) -> Snapshot:
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot
        return self.storage.snapshot()

    def find_conflict(self, ents: list[Entry]) -> int:
        """Index of the first entry whose term differs from ours (0 if none)."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest (i, term(i)) with i <= index and term(i) <= term: fast backtracking hint."""
        li = self.last_index()
        if index > li:
            return index, 0
        while True:
            try:
                t = self.term(index)
            except CompactedError:
                return index, 0
            if t <= term:
                return index, t
            index -= 1

    # -- changing the log -----------------------------------------------------------

    def append(self, ents: list[Entry]) -> int:
        """Put ents at the tail, overwriting any conflicting suffix of the unstable part."""
        if not ents:
            return self.last_index()
        after = ents[0].index
        if after <= self.committed:
            raise AssertionError(f"append at {after} would overwrite committed {self.committed}")
        n = self.offset + len(self.unstable)
        if after == n:
            self.unstable.extend(ents)
        elif after <= self.offset:
            self.offset = after
            self.unstable = list(ents)
        else:
            del self.unstable[after - self.offset :]
            self.unstable.extend(ents)
        return self.last_index()

    def maybe_append(self, index: int, log_term: int, committed: int, ents: list[Entry]) -> int | None:
        """Follower side of AppendEntries (§5.3); returns the last new index or None on mismatch."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        ci = self.find_conflict(ents)
        if ci:
            if ci <= self.committed:
                raise AssertionError(f"entry {ci} conflicts with committed entry (committed {self.committed})")
            self.append(ents[ci - index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, c: int) -> None:
        if c > self.committed:
            if c > self.last_index():
                raise AssertionError(f"commit {c} beyond last index {self.last_index()}")
            self.committed = c

    def maybe_commit(self, max_index: int, term: int, any_term: bool = False) -> bool:
        """§5.4.2: a leader commits by counting replicas only entries of its own term."""
        if max_index > self.committed and (any_term or self.term_or_zero(max_index) == term):
            self.commit_to(max_index)
            return True
        return False

    def restore(self, snap: Snapshot) -> None:
        self.committed = snap.metadata.index
        self.offset = snap.metadata.index + 1
        self.unstable = []
        self.unstable_snapshot = snap

    # -- what the Ready carries and what advance acknowledges --------------------------

    def has_next_committed(self) -> bool:
        return self.unstable_snapshot is None and self.committed > self.applying

    def next_committed(self, max_bytes: int | None = None) -> list[Entry]:
        lo = max(self.applying + 1, self.first_index())
        return self.entries(lo, self.committed + 1, max_bytes)

    def stable_to(self, i: int, t: int) -> None:
        k = i - self.offset
        if 0 <= k < len(self.unstable) and self.unstable[k].term == t:
            del self.unstable[: k + 1]
            self.offset = i + 1

    def stable_snap_to(self, i: int) -> None:
        if self.unstable_snapshot is not None and self.unstable_snapshot.metadata.index == i:
            self.unstable_snapshot = None

    def applied_to(self, i: int) -> None:
        if i > self.applied:
            self.applied = i
        if i > self.applying:
            self.applying = i
