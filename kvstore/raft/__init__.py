"""Raft consensus as a pure, deterministic state machine (see rawnode.RawNode)."""
from .config import Config
from .confchange import decode_conf_change, encode_conf_change
from .errors import ConfChangeRefused, ProposalDropped
from .memory_storage import MemoryStorage, SnapshotOutOfDate
from .progress import ProgressState
from .rawnode import RawNode
from .ready import ProgressView, Ready, Status
from .storage import CompactedError, SnapshotTemporarilyUnavailable, Storage, UnavailableError
from .types import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Snapshot,
    SnapshotMetadata,
    SoftState,
    StateRole,
)

__all__ = [
    "Config", "ConfChangeRefused", "RawNode", "Ready", "Status", "ProgressView", "ProgressState", "ProposalDropped",
    "MemoryStorage", "SnapshotOutOfDate", "Storage", "CompactedError", "UnavailableError",
    "SnapshotTemporarilyUnavailable", "ConfChange", "ConfState", "Entry", "EntryType", "HardState",
    "Message", "MessageType", "ReadState", "Snapshot", "SnapshotMetadata", "SoftState", "StateRole",
    "encode_conf_change", "decode_conf_change",
]
