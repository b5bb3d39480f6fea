"""The peer API, receiving side: raft message streams and snapshot uploads over TCP.

Each connection says in its hello what it carries (see `peer_wire.py`).
Messages of a STREAM connection are stepped into the node as they arrive;
the Ready loop does the rest. A SNAPSHOT connection's image is written to the
snapshot store first and only then is its SNAPSHOT message stepped, so by
the time raft asks the node to install it (in a Ready) the image is complete
and durable on disk. Anything that is not this protocol, or is another
cluster's, is logged and the connection closed; the node carries on. A
failure of our own disk while storing an image ends the process (see
supervisor.py); an image that is not what was announced is refused.

With peer TLS, each accepted socket gets the certificates current at that
moment (`connect_accepted_socket`), and a peer whose certificate the
cluster's CA did not sign is refused in the handshake, before any of its
bytes are parsed. (Upgrading an accepted stream instead races: uvloop may
already have read the ClientHello into the stream, and the handshake hangs.)
"""
from __future__ import annotations

import asyncio
import logging
import socket

from kvstore.raft.types import MessageType
from kvstore.storage.state_machine import SnapshotImageError
from kvstore.v1 import raft_pb2

from . import peer_wire as wire
from .node import Node
from .raft_codec import message_from_pb
from .supervisor import fatal
from .tls import PeerTLS

log = logging.getLogger("kvstore.peer")

HEARTBEAT_RESP = MessageType.HEARTBEAT_RESP.value
HELLO_TIMEOUT_S = 5.0
READ_BUFFER_BYTES = 8 << 20  # StreamReader limit: lets a whole 4 MiB snapshot chunk arrive in one go


class PeerServer:
    def __init__(self, node: Node, tls: PeerTLS | None = None) -> None:
        self.node = node
        self.tls = tls
        self.server: asyncio.base_events.Server | None = None
        self._listener: socket.socket | None = None  # with TLS: accepted by _accept
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen; OSError if the address cannot be bound."""
        if self.tls is None:
            self.server = await asyncio.start_server(self._serve, host or None, port, limit=READ_BUFFER_BYTES,
                                                     reuse_address=True)
            return
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self._track(asyncio.create_task(self._accept(self._listener), name="peer-accept"))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._connections):
            t.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    def _track(self, task: asyncio.Task) -> None:
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as e:  # out of descriptors, say: the listener stays, the next accept may succeed
                log.warning("accepting a peer connection failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._track(asyncio.create_task(self._serve_tls(conn, peer)))

    async def _serve_tls(self, conn: socket.socket, peer: object) -> None:
        """Handshake with the certificates current now, then serve; a refused handshake is logged."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_BUFFER_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            wire.tune_socket(conn)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.tls.server_context(), ssl_handshake_timeout=HELLO_TIMEOUT_S)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:  # ssl.SSLError (another CA, no certificate, not TLS), ConnectionError, TimeoutError
            conn.close()
            log.warning("refusing peer connection from %s: TLS handshake failed: %s", peer,
                        f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return
        await self._serve(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a connection callback runs as a task
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            if self.tls is None:
                wire.tune_socket(writer.get_extra_info("socket"))
            hello = await asyncio.wait_for(reader.readexactly(wire.HELLO.size), HELLO_TIMEOUT_S)
            purpose, cluster_id, member_id = wire.parse_hello(hello)
            if cluster_id != self.node.cfg.cluster_id:
                raise wire.PeerRefused(
                    f"member {member_id} is in cluster {cluster_id}; this is cluster {self.node.cfg.cluster_id}")
            if self.node.was_removed(member_id):
                raise wire.PeerRefused(
                    f"member {member_id} was removed from cluster {cluster_id}; it may rejoin only with a fresh "
                    f"data dir after `kvstore member add`")
            if purpose == wire.STREAM:
                await self._stream(reader)
            else:
                await self._snapshot(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender went away (it reconnects); nothing was half applied
        except wire.PeerProtocolError as e:
            log.warning("closing peer connection from %s: %s", peer, e)
            if isinstance(e, wire.PeerRefused):
                writer.write(wire.frame(wire.REFUSED, str(e).encode()))  # the sender logs it too
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a message that does not decode, say: drop the connection, not the node
            log.warning("closing peer connection from %s: %r", peer, e)
        finally:
            writer.transport.abort()
            self._connections.discard(task)

    async def _stream(self, reader: asyncio.StreamReader) -> None:
        node = self.node
        while True:
            kind, payload = await wire.read_frame(reader)
            if kind != wire.BATCH:
                raise wire.PeerProtocolError(f"frame kind {kind} on a message stream")
            batch = raft_pb2.RaftBatch.FromString(payload)
            sender = getattr(batch, "from")
            received = node.peer_received_bytes
            received[sender] = received.get(sender, 0) + len(payload)
            for pm in batch.messages:
                if pm.to == node.id:
                    if pm.type == HEARTBEAT_RESP:
                        _heartbeat_answered(node, sender)
                    node.step(message_from_pb(pm))

    async def _snapshot(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, payload = await wire.read_frame(reader)
        pm = raft_pb2.RaftMessage.FromString(payload) if kind == wire.SNAPSHOT_MESSAGE else None
        message = message_from_pb(pm) if pm is not None and pm.has_snapshot else None
        if message is None or message.snapshot is None:
            raise wire.PeerProtocolError("a snapshot upload must start with the snapshot message")
        meta = message.snapshot.metadata
        try:
            image = self.node.snapshots.receive(meta.index, meta.term, meta.conf_state.voters)
        except Exception as e:
            fatal(f"receiving snapshot {meta.index}", e)
        try:
            while True:
                kind, payload = await wire.read_frame(reader)
                if kind == wire.SNAPSHOT_END:
                    break
                if kind != wire.SNAPSHOT_DATA:
                    raise wire.PeerProtocolError(f"frame kind {kind} in a snapshot upload")
                await asyncio.to_thread(image.write, payload)
            if len(payload) != wire.SNAPSHOT_TRAILER.size:
                raise wire.PeerProtocolError("a snapshot upload must end with the image's size and CRC32C")
            size, crc = wire.SNAPSHOT_TRAILER.unpack(payload)
            await asyncio.to_thread(image.commit, size, crc)  # check, fsync + verify, off the event loop
        except wire.PeerProtocolError:
            image.abort()
            raise
        except Exception as e:
            if isinstance(e, (asyncio.IncompleteReadError, ConnectionError)):
                image.abort()
                raise
            if not isinstance(e, SnapshotImageError):  # our disk failed, not the sender's image
                fatal(f"receiving snapshot {meta.index}", e)
            image.abort()
            log.warning("receiving snapshot %d failed: %r", meta.index, e)
            writer.write(wire.frame(wire.SNAPSHOT_ACK, raft_pb2.SnapshotAck(ok=False, error=str(e)).SerializeToString()))
            await writer.drain()
            return
        except asyncio.CancelledError:
            image.abort()
            raise
        log.info("received snapshot at index %d from member %d", meta.index, message.frm)
        self.node.step(message)
        writer.write(wire.frame(wire.SNAPSHOT_ACK, raft_pb2.SnapshotAck(ok=True).SerializeToString()))
        await writer.drain()


def _heartbeat_answered(node: Node, peer_id: int) -> None:
    """A follower answered our heartbeat: its round trip goes to the peer RTT histogram."""
    peer = node.transport.peers.get(peer_id) if node.transport else None
    rtt = peer.heartbeat_answered() if peer is not None else None
    if rtt is not None:
        node.metrics.rtt(peer_id).observe(rtt)
