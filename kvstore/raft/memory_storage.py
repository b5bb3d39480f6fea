"""An in-memory Storage for tests and the simulator.

It follows exactly the protocol a real node follows: the node loop appends
`Ready.entries`, saves `Ready.hard_state`, installs `Ready.snapshot`, and
compacts after taking a snapshot. In the simulator this object *is* the disk:
whatever reached it survives a crash, nothing else does.
"""
from __future__ import annotations

from .storage import CompactedError, UnavailableError
from .types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from .util import limit_size


class SnapshotOutOfDate(Exception):
    """A snapshot older than the one already held was offered."""


class MemoryStorage:
    def __init__(self) -> None:
        self._hs = HardState()
        self._snapshot = Snapshot()
        # _ents[0] is a dummy entry standing for the snapshot (index, term).
        self._ents: list[Entry] = [Entry(term=0, index=0)]

    # -- the read side (kvstore.raft.storage.Storage) --------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        hs = self._hs
        cs = self._snapshot.metadata.conf_state
        return HardState(hs.term, hs.vote, hs.commit), ConfState(list(cs.voters), list(cs.learners))

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        off = self._ents[0].index
        if lo <= off:
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        return limit_size(self._ents[lo - off : hi - off], max_bytes)

    def term(self, index: int) -> int:
        off = self._ents[0].index
        if index < off:
            raise CompactedError(index)
        if index - off >= len(self._ents):
            raise UnavailableError(index)
        return self._ents[index - off].term

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- the write side (what the node loop does with a Ready) -----------------

    def set_hard_state(self, hs: HardState) -> None:
        self._hs = HardState(hs.term, hs.vote, hs.commit)

    def hard_state(self) -> HardState:
        return HardState(self._hs.term, self._hs.vote, self._hs.commit)

    def append(self, entries: list[Entry]) -> None:
        """Append, first truncating any suffix that the new entries overwrite."""
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return  # entirely compacted away
        if first > entries[0].index:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        n = len(self._ents)
        if offset > n:
            raise UnavailableError(f"missing log entry [last: {self.last_index()}, append at: {entries[0].index}]")
        del self._ents[offset:]
        self._ents.extend(entries)

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log by a received snapshot."""
        if snap.metadata.index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDate(snap.metadata.index)
        self._snapshot = snap
        self._ents = [Entry(term=snap.metadata.term, index=snap.metadata.index)]

    def create_snapshot(self, index: int, conf_state: ConfState | None, data: bytes) -> Snapshot:
        """Record a state machine image taken at `index` (already applied)."""
        if index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDate(index)
        if index > self.last_index():
            raise UnavailableError(index)
        cs = conf_state if conf_state is not None else self._snapshot.metadata.conf_state
        self._snapshot = Snapshot(
            SnapshotMetadata(index=index, term=self.term(index), conf_state=ConfState(list(cs.voters), list(cs.learners))),
            data,
        )
        return self._snapshot

    def compact(self, index: int) -> None:
        """Discard entries before `index` (index itself becomes the dummy)."""
        off = self._ents[0].index
        if index <= off:
            raise CompactedError(index)
        if index > self.last_index():
            raise UnavailableError(index)
        i = index - off
        self._ents = [Entry(term=self._ents[i].term, index=index)] + self._ents[i + 1 :]
