"""The Maintenance API: members' key/value hashes (HashKV), the alarm list and backups (like etcd's)."""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from kvstore.storage.state_machine import StateMachineClosed

from kvstore.storage import alarms as alarm_set
from kvstore.v1 import command_pb2, maintenance_pb2, maintenance_pb2_grpc

from .corruption import HASH_TIMEOUT_S, leader_hash, member_hash
from .errors import RequestFailed, invalid_argument, shutting_down
from .kv_service import handles_errors
from .node import Node


SNAPSHOT_CHUNK_BYTES = 1 << 20


class MaintenanceService(maintenance_pb2_grpc.MaintenanceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    def _timeout(self, context) -> float:
        left = context.time_remaining()
        return HASH_TIMEOUT_S if left is None else max(0.0, min(left, HASH_TIMEOUT_S))

    @handles_errors
    async def HashKV(self, request: maintenance_pb2.HashKVRequest, context) -> maintenance_pb2.HashKVResponse:
        self.node.check_serving()
        if request.index == 0:
            mark = await leader_hash(self.node, self._timeout(context))  # followers redirect
        else:
            mark = await member_hash(self.node, request.index, self._timeout(context))
        return maintenance_pb2.HashKVResponse(header=self.node.header(), index=mark.index, revision=mark.revision,
                                              hash=mark.hash)

    @handles_errors
    async def Alarm(self, request: maintenance_pb2.AlarmRequest, context) -> maintenance_pb2.AlarmResponse:
        node = self.node
        assert node.sm is not None  # serving, so started
        node.check_serving()
        if request.action == maintenance_pb2.AlarmRequest.DEACTIVATE:
            if request.alarm and request.alarm not in alarm_set.KNOWN:
                raise invalid_argument(f"unknown alarm {request.alarm!r} (known: {', '.join(alarm_set.KNOWN)})")
            change = command_pb2.AlarmChange(member_id=request.member_id, alarm=request.alarm, activate=False)
            await node.propose_internal(command_pb2.Command(alarm=change), self._timeout(context))
        return maintenance_pb2.AlarmResponse(
            header=node.header(),
            alarms=[maintenance_pb2.AlarmMember(member_id=m, alarm=a) for m, a in sorted(node.sm.alarms)],
        )

    async def Snapshot(self, request: maintenance_pb2.SnapshotRequest,
                       context) -> AsyncIterator[maintenance_pb2.SnapshotResponse]:
        """Stream this member's state machine image as it is now (one LMDB read transaction).

        Any member serves it, from its own applied state: a backup needs no
        leader. The last message carries the size and SHA-256 of every byte
        sent; the receiver checks them (kvstore.storage.backup).
        """
        node = self.node
        try:
            node.check_serving()
            index, term, stream = node.open_image_for_backup()
        except StateMachineClosed:
            await shutting_down().abort(context)
            return
        except RequestFailed as e:
            await e.abort(context)
            return
        try:
            yield maintenance_pb2.SnapshotResponse(header=node.header(), index=index, term=term)
            digest = hashlib.sha256()
            size = 0
            while chunk := await asyncio.to_thread(stream.read, SNAPSHOT_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
                yield maintenance_pb2.SnapshotResponse(blob=chunk)
            yield maintenance_pb2.SnapshotResponse(done=True, size=size, sha256=digest.digest())
        finally:
            await asyncio.to_thread(stream.close)
