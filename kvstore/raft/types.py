"""The values the Raft core exchanges with the outside world.

Plain slotted classes rather than protobuf messages: the core and its
simulator create millions of these, and a slotted Python object is several
times cheaper to build and read than a protobuf message. The transport
(kvstore/server) converts them to and from the wire format at the edge.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1  # single-server membership change; payload is a ConfChange


class StateRole(enum.IntEnum):
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2
    PRE_CANDIDATE = 3


class MessageType(enum.IntEnum):
    # local messages (never sent over the wire)
    HUP = 0  # start an election
    BEAT = 1  # leader: send heartbeats
    PROPOSE = 2
    READ_INDEX = 3  # also sent follower -> leader to forward a read request
    # peer messages
    APPEND = 10
    APPEND_RESP = 11
    VOTE = 12
    VOTE_RESP = 13
    PRE_VOTE = 14
    PRE_VOTE_RESP = 15
    SNAPSHOT = 16
    HEARTBEAT = 17
    HEARTBEAT_RESP = 18
    READ_INDEX_RESP = 19
    TIMEOUT_NOW = 20
    TRANSFER_LEADER = 21
    # local status reports from the transport
    UNREACHABLE = 30
    SNAP_STATUS = 31


@dataclass(slots=True)
class Entry:
    """One log entry. `data` is opaque to the core."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(slots=True)
class HardState:
    """What must be on disk before any message that relies on it is sent."""

    term: int = 0
    vote: int = 0  # 0 = none
    commit: int = 0


@dataclass(slots=True)
class ConfState:
    """Cluster membership as of some log index."""

    voters: list[int] = field(default_factory=list)
    learners: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ConfChange:
    """A single-server membership change (Raft thesis §4.1)."""

    ADD_NODE = 0
    REMOVE_NODE = 1
    ADD_LEARNER = 2

    change_type: int
    node_id: int
    context: bytes = b""


@dataclass(slots=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(slots=True)
class Snapshot:
    """A state machine image at `metadata.index`.

    `data` is opaque to the core. For a large state machine the storage layer
    may leave it empty and stream the image separately (the transport does).
    """

    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.metadata.index == 0


@dataclass(slots=True)
class Message:
    type: MessageType
    to: int = 0
    frm: int = 0
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0  # conflict hint: follower's index to retry from
    reject_hint_term: int = 0  # term of the entry at reject_hint (fast backtracking)
    snapshot: Snapshot | None = None
    context: bytes = b""  # read-index request context, campaign-transfer marker


@dataclass(slots=True)
class ReadState:
    """A read request (identified by `ctx`) may be served once applied >= index."""

    index: int
    ctx: bytes


@dataclass(slots=True)
class SoftState:
    """Volatile state that the node loop may want to observe (not persisted)."""

    leader_id: int
    role: StateRole
