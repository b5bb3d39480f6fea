"""The Cluster API: status, the member list, leadership transfer, membership changes.

Status and MemberList are served by any member from its own view, so an
operator can ask each member what it believes (that is the point of a status
table). TransferLeadership and the membership changes (MemberAdd, MemberRemove,
MemberUpdate, MemberPromote) must reach the leader; followers redirect them.
A change is answered once it is applied on the leader, with the member list
after it.
"""
from __future__ import annotations

from kvstore.raft.types import ConfChange
from kvstore.storage.members import MemberSet, attributes
from kvstore.v1 import cluster_pb2, cluster_pb2_grpc, command_pb2

from .config import split_scheme
from .errors import invalid_argument
from .kv_service import handles_errors
from .node import Node

CHANGE_TIMEOUT_S = 10.0


def member_list(node: Node, members: MemberSet) -> list[cluster_pb2.Member]:
    """Every member, with https:// URLs where that listener is TLS (as etcd's member list shows them)."""
    cfg = node.cfg
    peer_scheme = "https://" if cfg.peer_cert_file else ""
    client_scheme = "https://" if cfg.cert_file else ""
    out = []
    for i in members.ids:
        m = members.info.get(i)
        out.append(cluster_pb2.Member(
            id=i, name=m.name if m else f"node{i}",
            peer_urls=[peer_scheme + u for u in (m.peer_urls if m else ())],
            client_urls=[client_scheme + u for u in (m.client_urls if m else ())],
            is_learner=i in members.learners,
        ))
    return out


def _addrs(urls, what: str) -> list[str]:
    out = []
    for url in urls:
        addr = split_scheme(url.strip())[1]
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise invalid_argument(f"{what} {url!r}: expected HOST:PORT (or http(s)://HOST:PORT)")
        out.append(addr)
    return out


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    def _timeout(self, context) -> float:
        left = context.time_remaining()
        return CHANGE_TIMEOUT_S if left is None else max(0.1, min(left, CHANGE_TIMEOUT_S))

    @handles_errors
    async def Status(self, request, context) -> cluster_pb2.StatusResponse:
        return cluster_pb2.StatusResponse(header=self.node.header(), **self.node.status())

    @handles_errors
    async def MemberList(self, request, context) -> cluster_pb2.MemberListResponse:
        return cluster_pb2.MemberListResponse(header=self.node.header(), members=member_list(self.node, self.node.members),
                                              leader_id=self.node.leader_id)

    @handles_errors
    async def TransferLeadership(self, request, context) -> cluster_pb2.TransferLeadershipResponse:
        self.node.check_leader()
        timeout = context.time_remaining() or 5.0
        leader = await self.node.transfer_leadership(request.target_id, min(timeout, 5.0))
        return cluster_pb2.TransferLeadershipResponse(header=self.node.header(), leader_id=leader)

    @handles_errors
    async def MemberAdd(self, request: cluster_pb2.MemberAddRequest, context) -> cluster_pb2.MemberAddResponse:
        node = self.node
        node.check_leader()
        peer_urls = _addrs(request.peer_urls, "peer URL")
        client_urls = _addrs(request.client_urls, "client URL")
        if not peer_urls:
            raise invalid_argument("a new member needs at least one peer URL")
        members = node.members
        for i in members.ids:
            if set(peer_urls) & set(members.info[i].peer_urls if i in members.info else ()):
                raise invalid_argument(f"peer URL {peer_urls[0]} is already member {i}'s")
        new_id = max([*members.ids, *members.removed]) + 1  # ids are never reused
        name = request.name or f"node{new_id}"
        kind = ConfChange.ADD_LEARNER if request.is_learner else ConfChange.ADD_NODE
        cc = ConfChange(kind, new_id, attributes(name, peer_urls, client_urls))
        after = await node.change_membership(cc, self._timeout(context))
        listed = member_list(node, after)
        return cluster_pb2.MemberAddResponse(header=node.header(), member=next(m for m in listed if m.id == new_id),
                                             members=listed)

    @handles_errors
    async def MemberRemove(self, request: cluster_pb2.MemberRemoveRequest, context) -> cluster_pb2.MemberRemoveResponse:
        node = self.node
        node.check_leader()
        if request.id not in node.members.ids:
            raise invalid_argument(f"member {request.id} is not in the cluster")
        after = await node.change_membership(ConfChange(ConfChange.REMOVE_NODE, request.id), self._timeout(context))
        return cluster_pb2.MemberRemoveResponse(header=node.header(), members=member_list(node, after))

    @handles_errors
    async def MemberPromote(self, request: cluster_pb2.MemberPromoteRequest, context) -> cluster_pb2.MemberPromoteResponse:
        node = self.node
        node.check_leader()
        if request.id not in node.members.learners:
            what = "a voter already" if request.id in node.members.voters else "not in the cluster"
            raise invalid_argument(f"member {request.id} is {what}; only a learner can be promoted")
        after = await node.change_membership(ConfChange(ConfChange.ADD_NODE, request.id), self._timeout(context))
        return cluster_pb2.MemberPromoteResponse(header=node.header(), members=member_list(node, after))

    @handles_errors
    async def MemberUpdate(self, request: cluster_pb2.MemberUpdateRequest, context) -> cluster_pb2.MemberUpdateResponse:
        node = self.node
        node.check_leader()
        if request.id not in node.members.ids:
            raise invalid_argument(f"member {request.id} is not in the cluster")
        peer_urls = _addrs(request.peer_urls, "peer URL")
        if not peer_urls:
            raise invalid_argument("give at least one peer URL")
        cmd = command_pb2.Command(member_update=command_pb2.MemberUpdate(member_id=request.id, peer_urls=peer_urls))
        await node.propose_internal(cmd, self._timeout(context))
        return cluster_pb2.MemberUpdateResponse(header=node.header(), members=member_list(node, node.members))
