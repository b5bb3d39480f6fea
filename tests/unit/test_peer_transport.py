"""The peer transport over real TCP sockets: Transport (sending) -> PeerServer (receiving).

The receiving node is a recorder with a real SnapshotStore: these tests are
about the wire — messages arrive intact and in order, snapshots arrive whole
and durable before their message is stepped, and anything that is not a peer
of this cluster is dropped without harming the receiver.
"""
from __future__ import annotations

import asyncio
import os
import struct
import types

import pytest

from kvstore.raft.types import ConfState, Entry, Message, MessageType, Snapshot, SnapshotMetadata
from kvstore.server import peer_wire as wire
from kvstore.launcher import free_ports
from kvstore.server.peer_server import PeerServer
from kvstore.server.transport import Transport
from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

CLUSTER = 7
DEADLINE_S = 20.0


class Receiver:
    """What PeerServer needs of a node: its id, cluster, snapshot store, step() and traffic counts."""

    def __init__(self, member_id: int, snap_dir: str) -> None:
        self.id = member_id
        self.peer_received_bytes: dict[int, int] = {}
        self.transport = None  # no outgoing side: heartbeat answers time no round trip
        self.cfg = types.SimpleNamespace(cluster_id=CLUSTER)
        self.snapshots = SnapshotStore(snap_dir)
        self.stepped: list[Message] = []
        self.arrived = asyncio.Event()
        self.removed: set[int] = set()

    def was_removed(self, member_id: int) -> bool:
        return member_id in self.removed

    def step(self, m: Message) -> None:
        self.stepped.append(m)
        self.arrived.set()


class Sender:
    def __init__(self, peers: dict[int, str], snapshots: SnapshotStore | None = None, cluster_id: int = CLUSTER):
        self.unreachable: list[int] = []
        self.snapshot_reports: list[tuple[int, bool]] = []
        self.reported = asyncio.Event()
        self.transport = Transport(
            1, cluster_id, peers,
            report_unreachable=self.unreachable.append,
            report_snapshot=self._report_snapshot,
            open_snapshot=(snapshots.open_image if snapshots else None),
        )

    def _report_snapshot(self, peer: int, ok: bool) -> None:
        self.snapshot_reports.append((peer, ok))
        self.reported.set()


async def wait_until(predicate, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def appends(n: int, start: int = 1, to: int = 2) -> list[Message]:
    return [Message(type=MessageType.APPEND, to=to, frm=1, term=3, log_term=3, index=start + i - 1, commit=start + i - 1,
                    entries=[Entry(term=3, index=start + i, data=os.urandom(100))]) for i in range(n)]


def same(a: Message, b: Message) -> bool:
    return (a.type, a.to, a.frm, a.term, a.log_term, a.index, a.commit,
            [(e.term, e.index, e.data) for e in a.entries]) == \
           (b.type, b.to, b.frm, b.term, b.log_term, b.index, b.commit,
            [(e.term, e.index, e.data) for e in b.entries])


@pytest.fixture
def port():
    return free_ports(1)[0]


def run(coro):
    asyncio.run(coro)


def test_messages_arrive_intact_and_in_order(tmp_path, port):
    async def main():
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        sender = Sender({2: f"127.0.0.1:{port}"})
        sender.transport.start()
        peer = sender.transport.peers[2]
        await wait_until(lambda: peer.writer is not None, "the connection")
        sent = []
        for chunk in range(20):  # many Readies, several messages each, some big enough to split frames
            msgs = appends(50, start=1 + chunk * 50)
            if chunk == 7:
                msgs.append(Message(type=MessageType.APPEND, to=2, frm=1, term=3, index=10_000,
                                    entries=[Entry(term=3, index=10_001, data=os.urandom(5 << 20))]))
            sender.transport.send(msgs)
            sent.extend(msgs)
        await wait_until(lambda: len(node.stepped) == len(sent), "every message")
        assert all(same(a, b) for a, b in zip(sent, node.stepped))
        await sender.transport.stop()
        await server.stop()
    run(main())


def test_a_peer_that_is_down_costs_nothing_and_is_reached_once_up(tmp_path, port):
    async def main():
        sender = Sender({2: f"127.0.0.1:{port}"})
        sender.transport.start()
        sender.transport.send(appends(3))  # nobody listens: dropped, never raises, never blocks
        await wait_until(lambda: len(sender.unreachable) >= 2, "unreachable reports")
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        peer = sender.transport.peers[2]
        await wait_until(lambda: peer.writer is not None, "the reconnect")
        sender.transport.send(appends(1, start=9))
        await wait_until(lambda: node.stepped, "the message after the reconnect")
        assert [m.index for m in node.stepped] == [8]
        # the receiver restarts: the sender notices and reconnects
        await server.stop()
        await wait_until(lambda: peer.writer is None, "the break to be noticed")
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        await wait_until(lambda: peer.writer is not None, "the second reconnect")
        sender.transport.send(appends(1, start=20))
        await wait_until(lambda: len(node.stepped) == 2, "the message after the second reconnect")
        await sender.transport.stop()
        await server.stop()
    run(main())


def test_another_cluster_and_garbage_are_refused_and_the_receiver_goes_on(tmp_path, port):
    async def main():
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        stranger = Sender({2: f"127.0.0.1:{port}"}, cluster_id=CLUSTER + 1)
        stranger.transport.start()
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while len(stranger.unreachable) < 3:  # three connections refused, messages sent whenever one was up
            assert asyncio.get_running_loop().time() < deadline, "the stranger never got refused"
            stranger.transport.send(appends(2))
            await asyncio.sleep(0.002)
        junk = [b"\x00\xff" * 4096, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                wire.hello(wire.STREAM, CLUSTER, 9) + struct.pack("!IB", wire.MAX_FRAME_BYTES + 1, wire.BATCH),
                wire.hello(wire.STREAM, CLUSTER, 9) + wire.frame(wire.BATCH, b"\xff" * 64),
                wire.hello(wire.STREAM, CLUSTER, 9) + wire.frame(wire.SNAPSHOT_DATA, b"x"),
                wire.hello(wire.SNAPSHOT, CLUSTER, 9) + wire.frame(wire.SNAPSHOT_DATA, b"x")]
        for data in junk:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b"", "the server should close the connection"
            writer.close()
        assert node.stepped == [], "nothing from a stranger or from garbage may reach raft"
        assert os.listdir(node.snapshots.dir) == [], "no debris from a refused snapshot upload"
        friend = Sender({2: f"127.0.0.1:{port}"})
        friend.transport.start()
        await wait_until(lambda: friend.transport.peers[2].writer is not None, "a connection")
        friend.transport.send(appends(1))
        await wait_until(lambda: node.stepped, "the good message")
        for s in (stranger, friend):
            await s.transport.stop()
        await server.stop()
    run(main())


def test_a_removed_member_is_refused(tmp_path, port, caplog):
    async def main():
        node = Receiver(2, str(tmp_path / "snap"))
        node.removed.add(1)
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        removed = Sender({2: f"127.0.0.1:{port}"})  # member 1, of this cluster, removed earlier
        removed.transport.start()
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while len(removed.unreachable) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the removed member never got refused"
            removed.transport.send(appends(2))
            await asyncio.sleep(0.002)
        assert node.stepped == [], "nothing from a removed member may reach raft"
        await removed.transport.stop()
        await server.stop()
    run(main())
    assert "closing peer connection" in caplog.text and "member 1 was removed from cluster" in caplog.text
    assert "member 2 at 127.0.0.1" in caplog.text and "refuses this member: member 1 was removed" in caplog.text


def _image(tmp_path, entries: int) -> tuple[SnapshotStore, int, int]:
    sm = StateMachine.open(str(tmp_path / "sm"), 256 << 20, fsync=False)
    ops = [kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"k%06d" % i, value=os.urandom(2000)))
           for i in range(entries)]
    sm.apply([(i + 1, 2, command_pb2.Command(ops=[op], leader_clock_ms=1).SerializeToString())
              for i, op in enumerate(ops)])
    store = SnapshotStore(str(tmp_path / "leader-snap"))
    index, term, _ = store.create(sm, [1, 2, 3])
    sm.close()
    return store, index, term


def _snapshot_message(index: int, term: int) -> Message:
    meta = SnapshotMetadata(index=index, term=term, conf_state=ConfState(voters=[1, 2, 3]))
    return Message(type=MessageType.SNAPSHOT, to=2, frm=1, term=term, snapshot=Snapshot(metadata=meta))


def test_a_snapshot_arrives_whole_and_durable_before_its_message_is_stepped(tmp_path, port):
    async def main():
        leader_store, index, term = _image(tmp_path, 3000)  # ~6 MiB: several chunks
        node = Receiver(2, str(tmp_path / "follower-snap"))
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        sender = Sender({2: f"127.0.0.1:{port}"}, snapshots=leader_store)
        sender.transport.start()
        sender.transport.send([_snapshot_message(index, term)])
        await asyncio.wait_for(sender.reported.wait(), DEADLINE_S)
        assert sender.snapshot_reports == [(2, True)]
        assert [m.type for m in node.stepped] == [MessageType.SNAPSHOT]
        (got_index, got_term, voters, path), = node.snapshots.list()
        assert (got_index, got_term, voters) == (index, term, [1, 2, 3])
        with open(path, "rb") as a, leader_store.open_reader(index) as b:
            assert a.read() == b.read()
        await sender.transport.stop()
        await server.stop()
    run(main())


def test_a_snapshot_carries_the_membership_of_its_image(tmp_path, port):
    """The image is the state machine as it is now: members added since the log's snapshot are in it,
    and the message must say so (the follower's core takes its membership from the message)."""
    from kvstore.server.supervisor import SupervisedReader

    async def main():
        leader_store, index, term = _image(tmp_path, 10)
        newer = ConfState(voters=[1, 2, 3], learners=[4])

        def opener(i: int):
            at, t, f = leader_store.open_image(i)
            return at, t, SupervisedReader(f, "test image", newer)

        node = Receiver(2, str(tmp_path / "follower-snap"))
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        sender = Sender({2: f"127.0.0.1:{port}"})
        sender.transport.open_snapshot = opener
        sender.transport.start()
        sender.transport.send([_snapshot_message(index, term)])  # its metadata: voters 1, 2, 3 only
        await asyncio.wait_for(sender.reported.wait(), DEADLINE_S)
        assert [m.snapshot.metadata.conf_state for m in node.stepped] == [newer]
        await sender.transport.stop()
        await server.stop()
    run(main())


def test_a_snapshot_whose_image_does_not_match_its_message_is_refused(tmp_path, port):
    async def main():
        leader_store, index, term = _image(tmp_path, 10)
        node = Receiver(2, str(tmp_path / "follower-snap"))
        server = PeerServer(node)
        await server.start("127.0.0.1", port)
        leader_store.open_image = lambda _i: (index + 5, term, open(leader_store.latest()[3], "rb"))
        sender = Sender({2: f"127.0.0.1:{port}"}, snapshots=leader_store)
        sender.transport.start()
        sender.transport.send([_snapshot_message(index, term)])  # the opener announces index + 5
        await asyncio.wait_for(sender.reported.wait(), DEADLINE_S)
        assert sender.snapshot_reports == [(2, False)]
        assert node.stepped == [] and node.snapshots.list() == []
        await sender.transport.stop()
        await server.stop()
    run(main())


def test_hello_is_checked():
    assert wire.parse_hello(wire.hello(wire.STREAM, 5, 3)) == (wire.STREAM, 5, 3)
    with pytest.raises(wire.PeerProtocolError, match="not a kvstore peer"):
        wire.parse_hello(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[: wire.HELLO.size])
    with pytest.raises(wire.PeerProtocolError, match="purpose"):
        wire.parse_hello(wire.HELLO.pack(wire.MAGIC, 9, 5, 3))
    with pytest.raises(ValueError, match="exceeds"):
        wire.frame(wire.BATCH, b"x" * (wire.MAX_FRAME_BYTES + 1))
