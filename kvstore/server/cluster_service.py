"""The Cluster API: status of this member, the member list, leadership transfer.

Status and MemberList are served by any member from its own view, so an
operator can ask each member what it believes (that is the point of a status
table). TransferLeadership must reach the leader; followers redirect it.
"""
from __future__ import annotations

from kvstore.v1 import cluster_pb2, cluster_pb2_grpc

from .kv_service import handles_errors
from .node import Node


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @handles_errors
    async def Status(self, request, context) -> cluster_pb2.StatusResponse:
        return cluster_pb2.StatusResponse(header=self.node.header(), **self.node.status())

    @handles_errors
    async def MemberList(self, request, context) -> cluster_pb2.MemberListResponse:
        cfg = self.node.cfg
        # URLs say https:// when that listener is TLS, as etcd's member list does (clients accept either form).
        peer_scheme = "https://" if cfg.peer_cert_file else ""
        client_scheme = "https://" if cfg.cert_file else ""
        members = [
            cluster_pb2.Member(
                id=i,
                name=cfg.name if i == cfg.id else f"node{i}",
                peer_urls=[peer_scheme + cfg.peers[i]],
                client_urls=[client_scheme + cfg.clients[i]],
            )
            for i in cfg.member_ids
        ]
        return cluster_pb2.MemberListResponse(header=self.node.header(), members=members,
                                              leader_id=self.node.leader_id)

    @handles_errors
    async def TransferLeadership(self, request, context) -> cluster_pb2.TransferLeadershipResponse:
        self.node.check_leader()
        timeout = context.time_remaining() or 5.0
        leader = await self.node.transfer_leadership(request.target_id, min(timeout, 5.0))
        return cluster_pb2.TransferLeadershipResponse(header=self.node.header(), leader_id=leader)
