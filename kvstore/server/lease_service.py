"""The Lease API (etcd's): grant, revoke, keep-alive, time-to-live, list.

Grant and revoke are replicated (a LeaseChange entry). Under the NOSPACE
alarm a grant is refused (RESOURCE_EXHAUSTED), a revoke is not: it frees space. Keep-alive, time to
live and the list are answered by the leader only, after a ReadIndex round
has confirmed its leadership and its state machine caught up with it: a
member that was deposed without knowing it cannot renew a lease that the
real leader is about to expire.
"""
from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc

from kvstore.storage import alarms as alarm_set
from kvstore.storage.errors import ApplyError
from kvstore.storage.leases import MAX_LEASE_TTL
from kvstore.v1 import command_pb2, lease_pb2, lease_pb2_grpc

from .errors import RequestFailed, invalid_argument, not_applied
from .kv_service import apply_error, handles_errors
from .lessor import Lessor
from .node import Node


class LeaseService(lease_pb2_grpc.LeaseServicer):
    def __init__(self, node: Node, lessor: Lessor, min_ttl: int) -> None:
        self.node = node
        self.lessor = lessor
        self.min_ttl = min_ttl
        self.default_timeout = node.cfg.request_timeout_ms / 1000

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.default_timeout
        return max(0.0, min(remaining, self.default_timeout))

    async def _confirmed(self, timeout: float) -> None:
        """This member leads and has applied everything committed before now (ReadIndex)."""
        self.node.check_leader()
        await self.node.read_barrier(timeout)

    @handles_errors
    async def LeaseGrant(self, request: lease_pb2.LeaseGrantRequest, context) -> lease_pb2.LeaseGrantResponse:
        if request.ID < 0:
            raise invalid_argument(f"lease ID is {request.ID}; it must be > 0 (0: the leader chooses)")
        if request.TTL < 0:
            raise invalid_argument(f"lease TTL is {request.TTL}; it must be >= 0 seconds")
        if request.TTL > MAX_LEASE_TTL:
            raise not_applied(grpc.StatusCode.OUT_OF_RANGE,
                              f"lease TTL {request.TTL} is too large; the limit is {MAX_LEASE_TTL} seconds")
        self.node.check_leader()
        if alarm_set.has(self.node.sm.alarms, alarm_set.NOSPACE):  # a grant adds data (etcd refuses it too)
            q = self.node.space_quota
            raise not_applied(grpc.StatusCode.RESOURCE_EXHAUSTED, q.refusal())
        ttl = max(request.TTL, self.min_ttl)
        lease_id = request.ID or random.getrandbits(62) + 1
        grant = command_pb2.LeaseGrant(id=lease_id, ttl=ttl)
        result = await self.node.propose_internal(
            command_pb2.Command(lease=command_pb2.LeaseChange(grant=grant)), self._timeout(context))
        if isinstance(result, ApplyError):
            raise apply_error(result)
        self.lessor.granted(lease_id, ttl)
        return lease_pb2.LeaseGrantResponse(header=self._header(result.revision), ID=lease_id, TTL=ttl)

    @handles_errors
    async def LeaseRevoke(self, request: lease_pb2.LeaseRevokeRequest, context) -> lease_pb2.LeaseRevokeResponse:
        if request.ID <= 0:
            raise invalid_argument(f"lease ID is {request.ID}; it must be > 0")
        self.node.check_leader()
        result = await self.node.propose_internal(
            command_pb2.Command(lease=command_pb2.LeaseChange(revoke=request.ID)), self._timeout(context))
        if isinstance(result, ApplyError):
            raise apply_error(result)
        return lease_pb2.LeaseRevokeResponse(header=self._header(result.revision))

    async def LeaseKeepAlive(
        self, request_iterator: AsyncIterator[lease_pb2.LeaseKeepAliveRequest], context
    ) -> AsyncIterator[lease_pb2.LeaseKeepAliveResponse]:
        """One answer per request, in order; TTL 0: the lease is gone. A member that is not (or no
        longer) the leader ends the stream with the redirect, as a unary call would fail."""
        try:
            async for req in request_iterator:
                await self._confirmed(self.default_timeout)
                ttl = self.lessor.renew(req.ID)
                yield lease_pb2.LeaseKeepAliveResponse(header=self.node.header(), ID=req.ID, TTL=ttl)
        except RequestFailed as e:
            await e.abort(context)

    @handles_errors
    async def LeaseTimeToLive(
        self, request: lease_pb2.LeaseTimeToLiveRequest, context
    ) -> lease_pb2.LeaseTimeToLiveResponse:
        await self._confirmed(self._timeout(context))
        resp = lease_pb2.LeaseTimeToLiveResponse(header=self.node.header(), ID=request.ID,
                                                 TTL=self.lessor.remaining(request.ID))
        granted = self.node.sm.leases.get(request.ID)
        if granted is not None:
            resp.grantedTTL = granted
            if request.keys:
                resp.keys.extend(self.node.sm.lease_keys(request.ID))
        return resp

    @handles_errors
    async def LeaseLeases(self, request: lease_pb2.LeaseLeasesRequest, context) -> lease_pb2.LeaseLeasesResponse:
        await self._confirmed(self._timeout(context))
        return lease_pb2.LeaseLeasesResponse(
            header=self.node.header(), leases=[lease_pb2.LeaseStatus(ID=i) for i in sorted(self.node.sm.leases)])

    def _header(self, revision: int):
        header = self.node.header()
        header.revision = max(header.revision, revision)
        return header

