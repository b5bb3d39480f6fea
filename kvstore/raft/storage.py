"""The read-only view of the persisted log that the Raft core consults.

The core never writes storage itself: it hands entries, hard state and
snapshots out through `Ready`, the node loop persists them, and then appends
them to whatever implements this protocol (an in-memory log for tests, the
WAL-backed log in kvstore/storage for a real node).
"""
from __future__ import annotations

from typing import Protocol

from .types import ConfState, Entry, HardState, Snapshot


class CompactedError(Exception):
    """The requested index is below the first index still in the log."""


class UnavailableError(Exception):
    """The requested index is above the last index in the log."""


class SnapshotTemporarilyUnavailable(Exception):
    """A snapshot is being prepared; ask again later."""


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """The hard state and membership the node restarts with."""

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi); at least one entry even if it exceeds max_bytes.

        Raises CompactedError if lo <= the snapshot index.
        """

    def term(self, index: int) -> int:
        """Term of the entry at index; the snapshot's term for its index.

        Raises CompactedError below that, UnavailableError above last_index.
        """

    def first_index(self) -> int:
        """Index of the first entry still available (snapshot index + 1)."""

    def last_index(self) -> int:
        """Index of the last entry (the snapshot index if the log is empty)."""

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (may raise SnapshotTemporarilyUnavailable)."""
