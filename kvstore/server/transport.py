"""Raft messages to peers: one TCP connection per peer, written straight from the Ready loop.

`send()` encodes the messages of one Ready for each peer into one `RaftBatch`
frame and hands it to that peer's connection (`transport.write` never blocks:
the event loop flushes the socket). There is no queue and no task hop between
the Ready loop and the socket, so an AppendEntries leaves before the leader's
own fsync starts. When a connection is down, or its unsent buffer is over
`MAX_BUFFERED_BYTES` (a slow or partitioned peer), messages are dropped:
raft retransmits what matters, and a dead peer costs the loop nothing.

Each peer has a task that keeps the connection up: connect, send the hello,
wait for the connection to end (the peer never writes on it, so a read
returns only at EOF or error), report the peer unreachable to raft and
reconnect with backoff. The kernel notices a peer that vanished without
closing (keepalive, TCP_USER_TIMEOUT; see peer_wire).

Snapshots do not travel in the stream: a SNAPSHOT message opens a separate
connection that uploads an image, and its outcome is reported to raft. The
image is produced as it is sent (the node streams it from an LMDB read
transaction), so the message announces the index and term of the image
actually sent, at or past the one raft asked for; its CRC32C and size go in
the SNAPSHOT_END frame for the receiver to check.
The wire format is in `peer_wire.py`; the receiving side in `peer_server.py`.
With peer TLS (tls.py) every connection is mutual TLS, made with the
certificates current when it opens.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
import time
from typing import Protocol
from collections.abc import Callable

from kvstore.raft.types import Message, MessageType
from kvstore.storage.wal import crc32c
from kvstore.v1 import raft_pb2

from . import peer_wire as wire
from .logs import event
from .raft_codec import message_size, message_to_pb
from .tls import PeerTLS

log = logging.getLogger("kvstore.transport")

BATCH_MAX_BYTES = 4 << 20  # a Ready's messages to one peer are split into frames of about this size
MAX_BUFFERED_BYTES = 32 << 20  # unsent bytes per peer before messages are dropped
SNAPSHOT_CHUNK_BYTES = 4 << 20
SNAPSHOT_ACK_TIMEOUT_S = 60.0  # the receiver fsyncs and verifies the image before it answers
CONNECT_TIMEOUT_S = 1.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.25

class ImageReader(Protocol):
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


# Opens an image at or past the snapshot at `index`: (its index, its term, a reader).
SnapshotOpener = Callable[[int], tuple[int, int, ImageReader]]


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Peer:
    """The outgoing side of one peer: a connection kept up, and snapshot uploads."""

    def __init__(self, transport: Transport, peer_id: int, addr: str) -> None:
        self.transport = transport
        self.id = peer_id
        self.addr = addr
        self.host, self.port = _split_addr(addr)
        self.writer: asyncio.StreamWriter | None = None  # set while the connection is up
        self.dropped = 0  # messages dropped: the connection was down or not keeping up
        self.dropped_heartbeats = 0
        self.sent_bytes = 0
        self.heartbeat_sent_at = 0.0  # loop time of the oldest heartbeat not yet answered; 0: none
        self.tls_error = ""  # the last TLS failure logged, so a retry loop logs it once
        self.refused = ""  # likewise the last refusal by the peer
        self.task: asyncio.Task | None = None
        self.snapshot_task: asyncio.Task | None = None

    def write(self, messages: list[Message]) -> None:
        w = self.writer
        if w is None or w.transport.is_closing() or w.transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            self.dropped += len(messages)  # down (run() reconnects) or not keeping up
            self.dropped_heartbeats += sum(1 for m in messages if m.type == MessageType.HEARTBEAT)
            return
        t = self.transport
        batch, size = [], 0
        for m in messages:
            batch.append(message_to_pb(m))
            size += message_size(m)
            if m.type == MessageType.HEARTBEAT and not self.heartbeat_sent_at:
                self.heartbeat_sent_at = time.monotonic()  # its answer times the round trip
            if size >= BATCH_MAX_BYTES:
                frame = _batch_frame(t.cluster_id, t.member_id, batch)
                self.sent_bytes += len(frame)
                w.write(frame)
                batch, size = [], 0
        if batch:
            frame = _batch_frame(t.cluster_id, t.member_id, batch)
            self.sent_bytes += len(frame)
            w.write(frame)

    def heartbeat_answered(self) -> float | None:
        """The round trip of the oldest unanswered heartbeat, now answered; None if none was out."""
        sent, self.heartbeat_sent_at = self.heartbeat_sent_at, 0.0
        return time.monotonic() - sent if sent else None

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        lost = 0.0  # when the connection last broke, while it stays down
        while True:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)
                writer.write(wire.hello(wire.STREAM, self.transport.cluster_id, self.transport.member_id))
                self.writer = writer
                self.heartbeat_sent_at = 0.0  # one lost with the old connection is never answered
                self.tls_error = ""
                if lost:
                    log.info("peer member %d at %s became active again (was unreachable %.1fs)", self.id,
                             self.addr, time.monotonic() - lost,
                             extra=event("peer-regained", peer=self.id, down_s=round(time.monotonic() - lost, 1)))
                else:
                    log.info("connection to member %d at %s is up", self.id, self.addr)
                lost = 0.0
                backoff = BACKOFF_MIN_S
                data = await reader.read(1 << 16)  # returns only when the connection ends, or is refused
                reason = wire.refusal(data)
                if reason is not None:
                    if reason != self.refused:
                        log.warning("member %d at %s refuses this member: %s", self.id, self.addr, reason,
                                    extra=event("peer-refused", peer=self.id, reason=reason))
                    self.refused = reason
                    raise ConnectionError(f"refused: {reason}")
                raise ConnectionError("closed by the peer")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # OSError, TimeoutError, ConnectionError
                if self.writer is not None:
                    lost = time.monotonic()
                    log.warning("peer member %d at %s became inactive: connection broke: %s", self.id, self.addr,
                                _short(e), extra=event("peer-lost", peer=self.id, error=_short(e)))
                elif isinstance(e, ssl.SSLError) and _short(e) != self.tls_error:
                    # A peer that is down is retried quietly; a TLS refusal is a misconfiguration to show (once).
                    log.warning("TLS to member %d at %s failed: %s", self.id, self.addr, _short(e))
                    self.tls_error = _short(e)
            finally:
                self.writer = None  # from now on send() drops this peer's messages
                if writer is not None:
                    writer.transport.abort()
            self.transport.report_unreachable(self.id)
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A tuned connection to the peer: TLS (the current peer certificate, the host checked) when configured."""
        tls = self.transport.tls
        if tls is None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=tls.client_context(),
                                                           server_hostname=self.host)
        wire.tune_socket(writer.get_extra_info("socket"))
        return reader, writer

    def send_snapshot(self, m: Message) -> None:
        if self.snapshot_task is not None and not self.snapshot_task.done():
            return  # one upload at a time; raft hears about the current one when it ends
        self.snapshot_task = asyncio.create_task(self._send_snapshot(m))

    async def _send_snapshot(self, m: Message) -> None:
        assert m.snapshot is not None  # raft's MsgSnap always carries its snapshot
        index = m.snapshot.metadata.index
        ok = False
        writer = None
        image = None
        try:
            index, term, image = await asyncio.to_thread(self.transport.open_snapshot, index)
            # the image is the state machine as it is now: its index, term and membership, not the log's snapshot's
            conf_state = getattr(image, "conf_state", None) or m.snapshot.metadata.conf_state
            meta = dataclasses.replace(m.snapshot.metadata, index=index, term=term, conf_state=conf_state)
            m = dataclasses.replace(m, snapshot=dataclasses.replace(m.snapshot, metadata=meta))
            log.info("sending snapshot at index %d to member %d", index, self.id)
            reader, writer = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)
            writer.write(wire.hello(wire.SNAPSHOT, self.transport.cluster_id, self.transport.member_id))
            writer.write(wire.frame(wire.SNAPSHOT_MESSAGE, message_to_pb(m).SerializeToString()))
            sent, crc = 0, 0
            while True:
                data = await asyncio.to_thread(image.read, SNAPSHOT_CHUNK_BYTES)
                if not data:
                    break
                crc = crc32c(data, crc)
                writer.write(wire.frame(wire.SNAPSHOT_DATA, data))
                sent += len(data)
                await writer.drain()
            writer.write(wire.frame(wire.SNAPSHOT_END, wire.SNAPSHOT_TRAILER.pack(sent, crc)))
            kind, payload = await asyncio.wait_for(wire.read_frame(reader), SNAPSHOT_ACK_TIMEOUT_S)
            if kind != wire.SNAPSHOT_ACK:
                raise wire.PeerProtocolError(f"expected a snapshot ack, got frame kind {kind}")
            ack = raft_pb2.SnapshotAck.FromString(payload)
            ok = ack.ok
            if ok:
                log.info("snapshot at index %d (%d bytes) delivered to member %d", index, sent, self.id)
            else:
                log.warning("member %d refused snapshot %d: %s", self.id, index, ack.error)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("sending snapshot %d to member %d failed: %s", index, self.id, _short(e))
        finally:
            if image is not None:
                await asyncio.to_thread(image.close)  # may wait for the image's copy thread to stop
            if writer is not None:
                writer.transport.abort()
        self.transport.report_snapshot(self.id, ok)

    async def close(self) -> None:
        tasks = [t for t in (self.task, self.snapshot_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _batch_frame(cluster_id: int, member_id: int, messages: list) -> bytes:
    batch = raft_pb2.RaftBatch(cluster_id=cluster_id, messages=messages)
    setattr(batch, "from", member_id)  # `from` is a Python keyword
    return wire.frame(wire.BATCH, batch.SerializeToString())


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


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
        tls: PeerTLS | None = None,
    ) -> None:
        self.member_id = member_id
        self.tls = tls
        self.cluster_id = cluster_id
        self.report_unreachable = report_unreachable
        self.report_snapshot = report_snapshot
        self.open_snapshot = open_snapshot
        self.peers = {pid: Peer(self, pid, addr) for pid, addr in peers.items() if pid != member_id}

    def start(self) -> None:
        for p in self.peers.values():
            p.task = asyncio.create_task(p.run(), name=f"peer-{p.id}")

    def set_peers(self, peers: dict[int, str]) -> None:
        """The member set changed: connect to new members, drop removed ones, follow a changed address."""
        for pid, p in list(self.peers.items()):
            if peers.get(pid) != p.addr:
                del self.peers[pid]
                asyncio.ensure_future(p.close())
                log.info("peer %d dropped (%s)", pid, "removed" if pid not in peers else f"now at {peers[pid]}")
        for pid, addr in peers.items():
            if pid != self.member_id and pid not in self.peers:
                p = self.peers[pid] = Peer(self, pid, addr)
                p.task = asyncio.create_task(p.run(), name=f"peer-{pid}")
                log.info("peer %d added at %s", pid, addr)

    def send(self, messages: list[Message]) -> None:
        """Write `messages` now: one frame per peer (snapshots start an upload)."""
        if not messages:
            return
        by_peer: dict[int, list[Message]] = {}
        for m in messages:
            if m.type == MessageType.SNAPSHOT:
                peer = self.peers.get(m.to)
                if peer is not None:
                    peer.send_snapshot(m)
            else:
                by_peer.setdefault(m.to, []).append(m)
        for to, msgs in by_peer.items():
            peer = self.peers.get(to)
            if peer is None:
                log.debug("dropping %d messages to unknown member %d", len(msgs), to)
            else:
                peer.write(msgs)

    async def stop(self) -> None:
        await asyncio.gather(*(p.close() for p in self.peers.values()), return_exceptions=True)
