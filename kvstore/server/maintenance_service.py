"""The Maintenance API: members' key/value hashes (HashKV) and the alarm list (like etcd's)."""
from __future__ import annotations

from kvstore.storage import alarms as alarm_set
from kvstore.v1 import command_pb2, maintenance_pb2, maintenance_pb2_grpc

from .corruption import HASH_TIMEOUT_S, leader_hash, member_hash
from .errors import invalid_argument
from .kv_service import handles_errors
from .node import Node


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
