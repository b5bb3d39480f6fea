"""The peer API, receiving side: raft message streams and snapshot uploads.

Incoming messages are stepped into the node as they arrive; the Ready loop
does the rest. A snapshot image is written to the snapshot store first and
only then is its SNAPSHOT message stepped, so by the time raft asks the node
to install it (in a Ready) the image is complete and durable on disk.
"""
from __future__ import annotations

import asyncio
import logging

from kvstore.v1 import raft_pb2, raft_pb2_grpc

from .node import Node
from .raft_codec import message_from_pb

log = logging.getLogger("kvstore.peer")


class RaftService(raft_pb2_grpc.RaftServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def Stream(self, request_iterator, context) -> raft_pb2.RaftStreamAck:
        cluster_id = self.node.cfg.cluster_id
        async for batch in request_iterator:
            if batch.cluster_id != cluster_id:
                log.warning("refusing raft messages from cluster %d (this is cluster %d)", batch.cluster_id, cluster_id)
                break
            for pm in batch.messages:
                if pm.to != self.node.id:
                    continue
                self.node.step(message_from_pb(pm))
        return raft_pb2.RaftStreamAck()

    async def SendSnapshot(self, request_iterator, context) -> raft_pb2.SnapshotAck:
        writer = None
        message = None
        try:
            async for chunk in request_iterator:
                if message is None:
                    if not chunk.HasField("message") or not chunk.message.has_snapshot:
                        return raft_pb2.SnapshotAck(ok=False, error="first chunk carries no snapshot message")
                    message = message_from_pb(chunk.message)
                    meta = message.snapshot.metadata
                    writer = self.node.snapshots.receive(meta.index, meta.term, meta.conf_state.voters)
                if chunk.data:
                    await asyncio.to_thread(writer.write, chunk.data)
                if chunk.last:
                    break
            if message is None or writer is None:
                return raft_pb2.SnapshotAck(ok=False, error="empty snapshot stream")
            await asyncio.to_thread(writer.commit)  # fsync + verify, off the event loop
            writer = None
        except Exception as e:
            log.warning("receiving a snapshot failed: %r", e)
            if writer is not None:
                writer.abort()
            return raft_pb2.SnapshotAck(ok=False, error=str(e))
        log.info("received snapshot at index %d from member %d", message.snapshot.metadata.index, message.frm)
        self.node.step(message)
        return raft_pb2.SnapshotAck(ok=True)
