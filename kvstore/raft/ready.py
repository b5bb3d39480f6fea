"""What the node loop must do next, and a read-only view of a node's state."""
from __future__ import annotations

from dataclasses import dataclass, field

from .progress import ProgressState
from .types import Entry, HardState, Message, ReadState, Snapshot, SoftState, StateRole


@dataclass(slots=True)
class Ready:
    """One batch of work for the node loop.

    Order: send `messages`; persist `entries` (truncating indexes >=
    entries[0].index first), `hard_state` and `snapshot` (fsync if
    `must_sync`); then send `persisted_messages`; apply `committed_entries`
    (or before the persist, if `committed_are_durable()`); call
    `advance(ready)`. `messages` are safe to send before the fsync
    (thesis §10.2.1: the leader replicates in parallel with its own write);
    `persisted_messages` (votes, append acks) promise state in this Ready.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    persisted_messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    must_sync: bool = False

    def committed_are_durable(self) -> bool:
        """Whether every committed entry was persisted by an earlier Ready.

        Every entry not yet persisted is in `entries` (each Ready is persisted
        before the next), so committed entries below entries[0] are durable:
        the loop may apply them while this Ready's write is in flight (the
        leader's usual case). A follower's committed entries are often among
        its own new `entries`; applying those first could leave the state
        machine ahead of the log after a crash. A snapshot replaces the log.
        """
        if self.snapshot is not None and not self.snapshot.is_empty():
            return False
        return not self.entries or not self.committed_entries or \
            self.committed_entries[-1].index < self.entries[0].index


@dataclass(slots=True)
class ProgressView:
    match: int
    next: int
    state: ProgressState
    recent_active: bool
    inflight: int


@dataclass(slots=True)
class Status:
    id: int
    term: int
    vote: int
    commit: int
    applied: int
    lead: int
    role: StateRole
    progress: dict[int, ProgressView] = field(default_factory=dict)  # leader only
    lead_transferee: int = 0
