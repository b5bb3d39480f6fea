"""The durable Raft log: kvstore.raft.storage.Storage on top of the native WAL.

The node loop persists each Ready through append() (entries and hard state in
one write and one fdatasync, from a worker thread), and the Raft core reads it
back through the Storage protocol from the event loop thread. The Wal does the
locking: reads never wait for an fsync in progress, they see the log as of the
last completed append.

Indexes: entries live in (first_index() - 1, last_index()]. The entry just
before first_index() is the log's base: index 0 term 0 for a fresh log, else
the compaction point or an installed snapshot, and term() still answers for
it. After a restart the base may be lower than the last compact() (segments
are dropped whole, so a few compacted entries come back); that is harmless.
"""
from __future__ import annotations

import os

from kvstore.raft.storage import CompactedError, UnavailableError
from kvstore.raft.types import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata

from .durable_files import fsync_dir
from .wal import Wal, WalCompactedError, WalUnavailableError

_ENTRY_TYPES = {t.value: t for t in EntryType}


def _make_entry(index: int, term: int, etype: int, data: bytes) -> Entry:
    return Entry(term, index, _ENTRY_TYPES[etype], data)  # an unknown type: KeyError, a storage error


def _meta(snap: tuple | None) -> SnapshotMetadata:
    if snap is None:
        return SnapshotMetadata()
    index, term, voters, learners = snap
    return SnapshotMetadata(index, term, ConfState(list(voters), list(learners)))


class RaftLog:
    """Raft log storage backed by a segmented, checksummed WAL directory."""

    def __init__(self, wal: Wal):
        self._wal = wal

    @classmethod
    def open(cls, dir: str, segment_bytes: int = 64 << 20, applied_index: int = 0) -> RaftLog:
        """Open or create the log in `dir`, recovering it (may raise WalCorruptionError).

        applied_index (the state machine's): entries up to it have their
        payload checksums verified when read rather than at open, so a restart
        does not read the applied part of the log (see Recovery rules in
        native/_wal.pyx). 0 verifies everything at open.
        """
        created = not os.path.isdir(dir)
        log = cls(Wal(dir, segment_bytes, entry_factory=_make_entry, applied_index=applied_index))
        if created:
            fsync_dir(os.path.dirname(os.path.abspath(dir)))  # the new directory's entry
        return log

    # ---- Storage protocol (read side) -------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        term, vote, commit = self._wal.hard_state
        return HardState(term, vote, commit), _meta(self._wal.snapshot).conf_state

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        try:
            return self._wal.entries(lo, hi, max_bytes)
        except WalCompactedError:
            raise CompactedError(f"entry {lo} is compacted (first index {self.first_index()})") from None
        except WalUnavailableError:
            raise UnavailableError(f"entries up to {hi - 1} requested, last index {self.last_index()}") from None

    def term(self, index: int) -> int:
        try:
            return self._wal.term(index)
        except WalCompactedError:
            raise CompactedError(f"entry {index} is compacted (first index {self.first_index()})") from None
        except (WalUnavailableError, OverflowError):
            raise UnavailableError(f"entry {index} is past the last index {self.last_index()}") from None

    def first_index(self) -> int:
        return self._wal.base_index + 1

    def last_index(self) -> int:
        return self._wal.last_index

    def snapshot(self) -> Snapshot:
        """The latest snapshot's metadata; the image itself is streamed from files."""
        return Snapshot(metadata=_meta(self._wal.snapshot))

    # ---- writing ------------------------------------------------------------

    def append(self, entries: list[Entry], hard_state: HardState | None = None) -> None:
        """Persist entries (cutting a conflicting suffix) and the hard state: one write, one fdatasync."""
        hs = None if hard_state is None else (hard_state.term, hard_state.vote, hard_state.commit)
        self._wal.append(entries if type(entries) is list else list(entries), hs)

    def set_snapshot(self, meta: SnapshotMetadata) -> None:
        """Durably note that a local snapshot at meta.index exists (entries stay until compact)."""
        current = self._wal.snapshot
        if current is not None and meta.index < current[0]:
            raise ValueError(f"snapshot {meta.index} is older than the recorded snapshot {current[0]}")
        if meta.index > self.last_index():
            raise ValueError(f"snapshot {meta.index} is past the last index {self.last_index()}; use apply_snapshot")
        if meta.index >= self.first_index() and self.term(meta.index) != meta.term:
            raise ValueError(f"snapshot term {meta.term} does not match the log's term {self.term(meta.index)} at {meta.index}")
        cs = meta.conf_state
        self._wal.write_snapshot(meta.index, meta.term, cs.voters, cs.learners, reset=False)

    def apply_snapshot(self, meta: SnapshotMetadata) -> None:
        """A snapshot from the leader was installed: discard the log, continue after meta.index."""
        cs = meta.conf_state
        self._wal.write_snapshot(meta.index, meta.term, cs.voters, cs.learners, reset=True)

    def compact(self, index: int) -> None:
        """Entries <= index may go; whole WAL segments holding only such entries are deleted."""
        snap = self._wal.snapshot
        if snap is None or index > snap[0]:
            raise ValueError(f"cannot compact to {index}: the latest snapshot is at {snap[0] if snap else 0}")
        self._wal.compact(index)

    def wal_size(self) -> int:
        """Bytes the WAL segment files occupy on disk (preallocated space included)."""
        return self._wal.size_bytes()

    def close(self) -> None:
        self._wal.close()

    def __enter__(self) -> RaftLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
