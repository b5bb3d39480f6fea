"""kvstore.raft value types <-> the peer wire format (raft.proto).

The Raft core works with slotted Python objects (cheap to create by the
million); protobuf exists only on the wire, so conversion happens here, at the
transport's edge, and nowhere else.
"""
from __future__ import annotations

from kvstore.raft.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)
from kvstore.v1 import raft_pb2


def entry_to_pb(e: Entry) -> raft_pb2.RaftEntry:
    return raft_pb2.RaftEntry(term=e.term, index=e.index, type=int(e.type), data=e.data)


def entry_from_pb(p: raft_pb2.RaftEntry) -> Entry:
    return Entry(term=p.term, index=p.index, type=EntryType(p.type), data=p.data)


def snapshot_metadata_to_pb(m: SnapshotMetadata) -> raft_pb2.RaftSnapshotMetadata:
    return raft_pb2.RaftSnapshotMetadata(
        index=m.index,
        term=m.term,
        conf_state=raft_pb2.RaftConfState(voters=m.conf_state.voters, learners=m.conf_state.learners),
    )


def snapshot_metadata_from_pb(p: raft_pb2.RaftSnapshotMetadata) -> SnapshotMetadata:
    return SnapshotMetadata(
        index=p.index,
        term=p.term,
        conf_state=ConfState(voters=list(p.conf_state.voters), learners=list(p.conf_state.learners)),
    )


def message_to_pb(m: Message) -> raft_pb2.RaftMessage:
    p = raft_pb2.RaftMessage(
        type=int(m.type),
        to=m.to,
        term=m.term,
        log_term=m.log_term,
        index=m.index,
        commit=m.commit,
        reject=m.reject,
        reject_hint=m.reject_hint,
        reject_hint_term=m.reject_hint_term,
        context=m.context,
    )
    setattr(p, "from", m.frm)  # `from` is a Python keyword
    if m.entries:
        p.entries.extend(entry_to_pb(e) for e in m.entries)
    if m.snapshot is not None:
        p.has_snapshot = True
        p.snapshot.CopyFrom(snapshot_metadata_to_pb(m.snapshot.metadata))
        p.snapshot_data = m.snapshot.data
    return p


def message_from_pb(p: raft_pb2.RaftMessage) -> Message:
    snapshot = None
    if p.has_snapshot:
        snapshot = Snapshot(metadata=snapshot_metadata_from_pb(p.snapshot), data=p.snapshot_data)
    return Message(
        type=MessageType(p.type),
        to=p.to,
        frm=getattr(p, "from"),
        term=p.term,
        log_term=p.log_term,
        index=p.index,
        entries=[entry_from_pb(e) for e in p.entries],
        commit=p.commit,
        reject=p.reject,
        reject_hint=p.reject_hint,
        reject_hint_term=p.reject_hint_term,
        snapshot=snapshot,
        context=p.context,
    )


def message_size(m: Message) -> int:
    """A cheap estimate of a message's wire size, for batching by bytes."""
    return 64 + sum(len(e.data) + 24 for e in m.entries)
