"""Raft messages to peers: one long-lived gRPC stream per peer, never blocking the loop.

`send()` is called from the Ready loop and only enqueues: each peer has a
bounded queue drained by its own task, which packs many messages into one
`RaftBatch` stream message. A full queue drops messages (raft retransmits
what matters), so a slow or dead peer costs the loop nothing. A broken
stream is reported to raft as unreachable and re-opened with backoff; gRPC
keepalive notices a peer that vanished without closing its connection.

Snapshots do not travel in the stream: a SNAPSHOT message starts a separate
`SendSnapshot` upload of the image file, and its outcome is reported to raft.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable, Iterator

import grpc

from kvstore.raft.types import Message, MessageType
from kvstore.v1 import raft_pb2, raft_pb2_grpc

from .raft_codec import message_size, message_to_pb

log = logging.getLogger("kvstore.transport")

PEER_MAX_MESSAGE_BYTES = 64 << 20
QUEUE_MESSAGES = 4096
BATCH_MAX_MESSAGES = 512
BATCH_MAX_BYTES = 4 << 20
SNAPSHOT_CHUNK_BYTES = 1 << 20
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", PEER_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", PEER_MAX_MESSAGE_BYTES),
]

# What the peer server must allow for the client side's keepalive pings.
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]

# Opens the image of the snapshot at `index` for reading (a binary file object).
SnapshotOpener = Callable[[int], "object"]


class Peer:
    """The outgoing side of one peer: a queue, a stream, a reconnect loop."""

    def __init__(self, transport: "Transport", peer_id: int, addr: str) -> None:
        self.transport = transport
        self.id = peer_id
        self.addr = addr
        self.queue: asyncio.Queue[Message] = asyncio.Queue(QUEUE_MESSAGES)
        self.dropped = 0
        self.channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
        self.stub = raft_pb2_grpc.RaftStub(self.channel)
        self.task: asyncio.Task | None = None
        self.snapshot_task: asyncio.Task | None = None
        self.connected = False

    def enqueue(self, m: Message) -> None:
        try:
            self.queue.put_nowait(m)
        except asyncio.QueueFull:
            self.dropped += 1

    def _drain_stale(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            call = self.stub.Stream()
            try:
                while True:
                    batch = await self._next_batch()
                    await call.write(batch)
                    if not self.connected:
                        self.connected = True
                        backoff = BACKOFF_MIN_S
                        log.info("stream to member %d at %s is up", self.id, self.addr)
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as e:  # grpc.aio.AioRpcError, or a write on a finished call
                call.cancel()
                if self.connected:
                    log.warning("stream to member %d at %s broke: %s", self.id, self.addr, _short(e))
                self.connected = False
                self.transport.report_unreachable(self.id)
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                self._drain_stale()  # what queued while the link was down is stale

    async def _next_batch(self) -> raft_pb2.RaftBatch:
        first = await self.queue.get()
        msgs = [message_to_pb(first)]
        size = message_size(first)
        while len(msgs) < BATCH_MAX_MESSAGES and size < BATCH_MAX_BYTES and not self.queue.empty():
            m = self.queue.get_nowait()
            msgs.append(message_to_pb(m))
            size += message_size(m)
        batch = raft_pb2.RaftBatch(cluster_id=self.transport.cluster_id, messages=msgs)
        setattr(batch, "from", self.transport.member_id)
        return batch

    def send_snapshot(self, m: Message) -> None:
        if self.snapshot_task is not None and not self.snapshot_task.done():
            return  # one upload at a time; raft hears about the current one when it ends
        self.snapshot_task = asyncio.create_task(self._send_snapshot(m))

    async def _send_snapshot(self, m: Message) -> None:
        index = m.snapshot.metadata.index
        ok = False
        try:
            log.info("sending snapshot at index %d to member %d", index, self.id)
            reader = self.transport.open_snapshot(index)
            ack = await self.stub.SendSnapshot(_snapshot_chunks(self.transport.member_id, m, reader))
            ok = ack.ok
            if not ok:
                log.warning("member %d refused snapshot %d: %s", self.id, index, ack.error)
            else:
                log.info("snapshot at index %d delivered to member %d", index, self.id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("sending snapshot %d to member %d failed: %s", index, self.id, _short(e))
        self.transport.report_snapshot(self.id, ok)

    async def close(self) -> None:
        for t in (self.task, self.snapshot_task):
            if t is not None:
                t.cancel()
        await self.channel.close()


def _snapshot_chunks(member_id: int, m: Message, reader) -> Iterator[raft_pb2.SnapshotChunk]:
    """The snapshot message first, then the image in chunks; the file is closed at the end."""
    first = raft_pb2.SnapshotChunk(message=message_to_pb(m))
    setattr(first, "from", member_id)
    try:
        pending = first
        while True:
            data = reader.read(SNAPSHOT_CHUNK_BYTES)
            if not data:
                break
            if pending is not None:
                yield pending
            pending = raft_pb2.SnapshotChunk(data=data)
        if pending is None:
            pending = raft_pb2.SnapshotChunk()
        pending.last = True
        yield pending
    finally:
        reader.close()


def _short(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


class Transport:
    def __init__(
        self,
        member_id: int,
        cluster_id: int,
        peers: dict[int, str],
        *,
        report_unreachable: Callable[[int], None],
        report_snapshot: Callable[[int, bool], None],
        open_snapshot: SnapshotOpener,
    ) -> None:
        self.member_id = member_id
        self.cluster_id = cluster_id
        self.report_unreachable = report_unreachable
        self.report_snapshot = report_snapshot
        self.open_snapshot = open_snapshot
        self.peers = {pid: Peer(self, pid, addr) for pid, addr in peers.items() if pid != member_id}

    def start(self) -> None:
        for p in self.peers.values():
            p.task = asyncio.create_task(p.run(), name=f"peer-{p.id}")

    def send(self, messages: list[Message]) -> None:
        for m in messages:
            peer = self.peers.get(m.to)
            if peer is None:
                log.debug("dropping message to unknown member %d", m.to)
            elif m.type == MessageType.SNAPSHOT:
                peer.send_snapshot(m)
            else:
                peer.enqueue(m)

    async def stop(self) -> None:
        await asyncio.gather(*(p.close() for p in self.peers.values()), return_exceptions=True)
