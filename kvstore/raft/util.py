"""Small helpers shared by the log, the storage and the replication code."""
from __future__ import annotations

from .types import Entry

# Per-entry framing overhead counted against byte limits, so that a run of
# empty entries (no-ops) is still bounded by max_size_per_msg.
ENTRY_OVERHEAD = 16


def entry_size(e: Entry) -> int:
    return len(e.data) + ENTRY_OVERHEAD


def limit_size(ents: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix of ents within max_bytes, but always at least one entry."""
    if max_bytes is None or len(ents) <= 1:
        return ents
    size = 0
    for i, e in enumerate(ents):
        size += len(e.data) + ENTRY_OVERHEAD
        if size > max_bytes and i > 0:
            return ents[:i]
    return ents
