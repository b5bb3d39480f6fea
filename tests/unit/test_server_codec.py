"""raft_codec: every field of a raft message survives the wire."""
from kvstore.raft.types import ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata
from kvstore.server.raft_codec import message_from_pb, message_to_pb
from kvstore.v1 import raft_pb2


def roundtrip(m: Message) -> Message:
    wire = message_to_pb(m).SerializeToString()
    return message_from_pb(raft_pb2.RaftMessage.FromString(wire))


def test_append_roundtrip():
    m = Message(
        MessageType.APPEND, to=2, frm=1, term=7, log_term=6, index=41,
        entries=[Entry(6, 42, EntryType.NORMAL, b"x" * 10), Entry(7, 43, EntryType.CONF_CHANGE, b"")],
        commit=40, context=b"ctx",
    )
    assert roundtrip(m) == m


def test_reject_fields_roundtrip():
    m = Message(MessageType.APPEND_RESP, to=1, frm=3, term=7, index=10, reject=True,
                reject_hint=5, reject_hint_term=4)
    assert roundtrip(m) == m


def test_snapshot_roundtrip():
    snap = Snapshot(SnapshotMetadata(100, 5, ConfState([1, 2, 3], [4])), data=b"")
    m = Message(MessageType.SNAPSHOT, to=3, frm=1, term=5, snapshot=snap)
    back = roundtrip(m)
    assert back == m
    assert back.snapshot.metadata.conf_state.voters == [1, 2, 3]


def test_no_snapshot_stays_none():
    assert roundtrip(Message(MessageType.HEARTBEAT, to=2, frm=1, term=1)).snapshot is None
