"""The asyncio client: leader discovery, redirects, retries, exactly-once, coalescing.

    async with AsyncClient(["127.0.0.1:2379", "127.0.0.1:2479"]) as kv:
        await kv.put("greeting", "hello")
        print((await kv.get("greeting")).value)

Every call runs through ``_call``: pick an endpoint (the cached leader for
writes and linearizable reads, the balancer's choice for serializable reads),
send with a per-attempt timeout, and on failure either follow the redirect at
once, move to the next endpoint, or wait per the retry policy — until the
call's total deadline. Mutations carry a RequestId fixed before the first
attempt, so every retry is the same request to the state machine.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import grpc

from kvstore.client import errors
from kvstore.client.balancer import Balancer, make_balancer
from kvstore.client.auth_admin import AuthAdmin
from kvstore.client.breaker import CircuitBreaker
from kvstore.client.credentials import Credentials
from kvstore.client.coalescer import ANY, LEADER, Coalescer, response
from kvstore.client.endpoints import DEFAULT_CHANNEL_OPTIONS, DEFAULT_ENDPOINTS, Endpoints
from kvstore.client.election import Election
from kvstore.client.lease import Lease, LeaseGrant, LeaseTimeToLive
from kvstore.client.lock import Lock
from kvstore.client.tls import TLS
from kvstore.client.retry import ExponentialBackoff, RetryPolicy
from kvstore.client.retry_budget import RetryBudget
from kvstore.client.session import Session
from kvstore.client.stream import KIND, MD_LEADER_ADDR, MD_LEADER_ID, MD_NOT_APPLIED, AttemptFailed
from kvstore.client.txn import Txn, delete_request, range_request
from kvstore.client.watch import WatchEvent, WatchPosition, watch_events
from kvstore.storage.errors import AUTH_NOT_ENABLED
from kvstore.client.types import (
    BytesLike,
    DeleteResult,
    GetResult,
    Member,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
    to_bytes,
)
from kvstore.v1 import auth_pb2, cluster_pb2, kv_pb2, lease_pb2, maintenance_pb2

__all__ = ["AsyncClient", "DropReplyHook"]

#: DEBUG traces every failed attempt, redirect and backoff of a call (never a
#: first-try success): enough to see where a failover's time went.
log = logging.getLogger("kvstore.client")

#: Statuses that, with no trailing metadata from a member, mean no member answered.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: The ``causes`` key saying a call waited for the retry budget.
BUDGET_CAUSE = "retry budget"

#: Four streams per member: kvstore bench, put and get x256, 4 vs 1 in alternation on a
#: shared 2-core machine, was ahead in 5 of 6 pairs (coalesced put 42.5k vs 22.7k/s).
DEFAULT_STREAMS_PER_MEMBER = 4

#: How KV calls travel: session streams to each member, or one unary RPC per call.
TRANSPORTS = ("stream", "unary")

#: Test-only fault hook: called with (rpc name, request) after an RPC completed;
#: returning True makes the client discard the reply and act as if the
#: connection broke (UNAVAILABLE, outcome unknown), so it retries.
DropReplyHook = Callable[[str, Any], bool]

#: Calls sent without a token (they are how one gets a token).
_NO_TOKEN = frozenset({"Authenticate"})

_STATUS_REQ = cluster_pb2.StatusRequest()
_MEMBERS_REQ = cluster_pb2.MemberListRequest()


class _LostReply(Exception):
    """Raised in place of a reply discarded by the test fault hook."""


def _never_sent(code: grpc.StatusCode, details: str) -> bool:
    """gRPC failed the call before sending it: no connection to the member could be made."""
    return code is grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect to all addresses")


def _metadata(err: grpc.aio.AioRpcError) -> dict[str, str]:
    md = err.trailing_metadata()
    if not md:
        return {}
    out: dict[str, str] = {}
    for k, v in md:
        out[k] = v.decode() if isinstance(v, bytes) else v
    return out


class AsyncClient(AuthAdmin):
    """asyncio client for a kvstore cluster. Create once, share, close at the end.

    ``endpoints``: any members' client addresses (default: the local cluster).
    ``timeout``: total deadline of each call in seconds, retries included.
    ``retry``: a RetryPolicy (default: exponential backoff with full jitter).
    ``balancer``: how serializable reads are spread ("round_robin", the default,
    turns once per event-loop turn: reads made together go to one member;
    "random", "least_outstanding", or a Balancer such as ``Weighted({...})``).
    ``coalesce``: gather concurrent calls into Batch RPCs (on by default).
    ``breaker`` and ``retry_budget``: how hard failing calls may press the
    cluster (default: ``CircuitBreaker()`` and ``RetryBudget()``).
    ``transport``: "stream" (default) sends every KV call and Batch over
    session streams per member (see stream.py); "unary" makes one RPC per call.
    ``streams_per_member``: session streams opened to each member, used in
    turn (grpc.aio writes one message at a time per stream).
    ``tls``: a :class:`TLS` (CA, client certificate) for members serving TLS;
    ``https://`` endpoints without it trust the system's root CAs.
    ``user`` and ``password``: credentials for a cluster with auth enabled;
    the client authenticates before its first call (no token while auth is
    disabled), and again whenever a member refuses its token (it expired, or
    an auth change made it stale). See credentials.py.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str | None = None,
        *,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        balancer: str | Balancer | None = None,
        coalesce: bool = True,
        max_batch_ops: int = 256,
        max_batch_bytes: int = 1 << 20,
        client_id: int | None = None,
        channel_options: Iterable[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        transport: str = "stream",
        breaker: CircuitBreaker | None = None,
        retry_budget: RetryBudget | None = None,
        streams_per_member: int = DEFAULT_STREAMS_PER_MEMBER,
        tls: TLS | None = None,
        user: str | None = None,
        password: str | None = None,
        testing_drop_reply_after_send: DropReplyHook | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self.transport = transport
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget()
        self._streamed = KIND if transport == "stream" else {}
        if password is not None and not user:
            raise ValueError("a password needs a user")
        self._credentials = Credentials(user, password or "") if user else None
        self._endpoints = Endpoints(
            endpoints or DEFAULT_ENDPOINTS, tuple(channel_options), breaker, streams_per_member, tls,
            self._credentials,
        )
        self.timeout = timeout
        self.retry = retry or ExponentialBackoff()
        self._balancer = make_balancer(balancer)
        self.session = Session(client_id)
        self._coalescer: Coalescer | None = (
            Coalescer(
                self._call, max_ops=max_batch_ops, max_bytes=max_batch_bytes, timeout=timeout,
                retryable=lambda code: self.retry.is_retryable(errors.status_code(code)),
                session_expired=self._session_expired, session_unopened=self._session_unopened,
            )
            if coalesce
            else None
        )
        self._drop_reply = testing_drop_reply_after_send
        self._closed = False
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = float("-inf")

    # --- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Finish pending batches, then close every channel. Idempotent."""
        if self._closed:
            return
        if self._coalescer is not None:
            await self._coalescer.close()
        self._closed = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        await self._endpoints.close()

    @property
    def endpoints(self) -> list[str]:
        """Every client address known so far (given, and learned from the cluster)."""
        return list(self._endpoints.addrs)

    @property
    def leader(self) -> str | None:
        """The cached leader address (a hint; None until one is found)."""
        return self._endpoints.leader

    @property
    def coalescer(self) -> Coalescer | None:
        return self._coalescer

    # --- KV ----------------------------------------------------------------

    async def put(
        self, key: BytesLike, value: BytesLike, *, prev_kv: bool = False, lease: int = 0,
        timeout: float | None = None,
    ) -> PutResult:
        """Set ``key`` to ``value``; ``prev_kv=True`` also returns what it replaced. With ``lease``
        (a lease id), the key is deleted when the lease expires or is revoked (NotFound: no such lease)."""
        if self._coalescer is not None:
            fut = self.put_soon(key, value, prev_kv, lease, timeout)
            return PutResult.from_pb(await fut if timeout is None else await self._wait(fut, timeout, True))
        k = key if type(key) is bytes else to_bytes(key)
        v = value if type(value) is bytes else to_bytes(value)
        req = kv_pb2.PutRequest(key=k, value=v, prev_kv=prev_kv, lease=lease)
        return PutResult.from_pb(await self._call("Put", req, route=LEADER, mutation=True, timeout=timeout))

    def put_soon(self, key: BytesLike, value: BytesLike, prev_kv: bool = False, lease: int = 0,
                 timeout: float | None = None) -> asyncio.Future[Any]:
        """The put added to the coalescer's next batch, without a task (coalescing on, on the client's loop).

        Its future's result becomes a PutResult with ``PutResult.from_pb``; a
        ``timeout`` given here bounds the batch, not the wait for the future.
        """
        k = key if type(key) is bytes else to_bytes(key)
        v = value if type(value) is bytes else to_bytes(value)
        c = self._coalescer
        assert c is not None, "put_soon needs coalescing on"
        p, fut = c.add(LEADER, "request_put", True, len(k) + len(v) + 16, timeout)
        p.key = k
        p.value = v
        if prev_kv:
            p.prev_kv = True
        if lease:
            p.lease = lease
        return fut

    async def get(self, key: BytesLike, *, serializable: bool = False, revision: int = 0,
                  timeout: float | None = None) -> GetResult:
        """One key. Linearizable unless ``serializable=True`` (any member, maybe stale).

        ``revision``: the key as it was at that revision (0: now); ``Compacted`` below the
        compacted revision, ``FutureRevision`` past the current one.
        """
        if self._coalescer is not None:
            fut = self.get_soon(key, serializable, revision, timeout)
            return GetResult.from_pb(await fut if timeout is None else await self._wait(fut, timeout, False))
        k = key if type(key) is bytes else to_bytes(key)
        route = ANY if serializable else LEADER
        req = kv_pb2.RangeRequest(key=k, serializable=serializable, revision=revision)
        return GetResult.from_pb(await self._call("Range", req, route=route, mutation=False, timeout=timeout))

    def get_soon(self, key: BytesLike, serializable: bool = False, revision: int = 0,
                 timeout: float | None = None) -> asyncio.Future[Any]:
        """The get added to the coalescer's next batch, as ``put_soon`` (``GetResult.from_pb`` of its result)."""
        k = key if type(key) is bytes else to_bytes(key)
        c = self._coalescer
        assert c is not None, "get_soon needs coalescing on"
        r, fut = c.add(ANY if serializable else LEADER, "request_range", False, len(k) + 8, timeout)
        r.key = k
        if serializable:
            r.serializable = True
        if revision:
            r.revision = revision
        return fut

    async def range(
        self,
        start: BytesLike,
        end: BytesLike | None = None,
        *,
        prefix: bool = False,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
        revision: int = 0,
        timeout: float | None = None,
    ) -> RangeResult:
        """Keys in ``[start, end)``, or every key starting with ``start`` when ``prefix=True``.

        ``end="\\0"`` means every key >= start. ``revision``: as they were then (0: now).
        """
        req = range_request(
            start, end, prefix=prefix, limit=limit, keys_only=keys_only, count_only=count_only,
            serializable=serializable, revision=revision,
        )
        route = ANY if serializable else LEADER
        c = self._coalescer
        if c is not None:
            op, fut = c.add(route, "request_range", False, len(req.key) + len(req.range_end) + 16, timeout)
            op.CopyFrom(req)
            return RangeResult.from_pb(response(await self._wait(fut, timeout, False), "response_range"))
        return RangeResult.from_pb(await self._call("Range", req, route=route, mutation=False, timeout=timeout))

    async def delete(
        self,
        key: BytesLike,
        end: BytesLike | None = None,
        *,
        prefix: bool = False,
        prev_kv: bool = False,
        timeout: float | None = None,
    ) -> DeleteResult:
        """Delete one key, ``[key, end)``, or a prefix; ``deleted`` counts keys removed."""
        req = delete_request(key, end, prefix=prefix, prev_kv=prev_kv)
        c = self._coalescer
        if c is not None:
            op, fut = c.add(LEADER, "request_delete_range", True, len(req.key) + len(req.range_end) + 16, timeout)
            op.CopyFrom(req)
            return DeleteResult.from_pb(response(await self._wait(fut, timeout, True), "response_delete_range"))
        return DeleteResult.from_pb(await self._call("DeleteRange", req, route=LEADER, mutation=True, timeout=timeout))

    async def txn(
        self,
        txn: Txn | None = None,
        *,
        compare: Iterable[kv_pb2.Compare] = (),
        success: Iterable[Any] = (),
        failure: Iterable[Any] = (),
        timeout: float | None = None,
    ) -> TxnResult:
        """Run a transaction atomically; a failed compare gives ``succeeded=False``, not an error."""
        if txn is None:
            txn = Txn(compare, success, failure)
        req = txn.to_pb()
        c = self._coalescer
        if c is not None:
            op, fut = c.add(LEADER, "request_txn", True, req.ByteSize(), timeout)
            op.CopyFrom(req)
            return TxnResult.from_pb(response(await self._wait(fut, timeout, True), "response_txn"))
        return TxnResult.from_pb(await self._call("Txn", req, route=LEADER, mutation=True, timeout=timeout))

    # --- Lease -------------------------------------------------------------

    def lease(self, ttl: int, *, lease_id: int = 0) -> Lease:
        """``async with ac.lease(ttl=10) as lease:`` grants a lease and keeps it alive until the block
        ends, then revokes it; see kvstore/client/lease.py for how loss is reported."""
        return Lease(self, ttl, lease_id)

    def lock(self, name: BytesLike, *, ttl: int = 60, lease: Lease | None = None) -> Lock:
        """``async with ac.lock("name", ttl=10) as lock:`` holds lock NAME (under its own lease of ``ttl``
        seconds, or ``lease``); ``lock.token`` is its fencing token, ``lock.guard()`` the txn compare
        that fences a write (kvstore/client/lock.py)."""
        return Lock(self, name, ttl=ttl, lease=lease)

    def election(self, name: BytesLike, *, ttl: int = 60, lease: Lease | None = None) -> Election:
        """Election NAME: campaign, proclaim, leader, observe, resign (kvstore/client/election.py)."""
        return Election(self, name, ttl=ttl, lease=lease)

    async def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float | None = None) -> LeaseGrant:
        """A new lease of ``ttl`` seconds (raised to the cluster's minimum); ``lease_id`` 0: the leader picks."""
        req = lease_pb2.LeaseGrantRequest(TTL=ttl, ID=lease_id)
        resp = await self._call("LeaseGrant", req, route=LEADER, mutation=False, timeout=timeout)
        return LeaseGrant(resp.ID, resp.TTL)

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Revoke a lease, deleting its keys (NotFound: no such lease); the revision after."""
        req = lease_pb2.LeaseRevokeRequest(ID=lease_id)
        resp = await self._call("LeaseRevoke", req, route=LEADER, mutation=False, timeout=timeout)
        return int(resp.header.revision)

    async def lease_keep_alive_once(self, lease_id: int, *, timeout: float | None = None
                                    ) -> lease_pb2.LeaseKeepAliveResponse:
        """One keep-alive: the answer's TTL is the new TTL, 0 if the lease no longer exists."""
        req = lease_pb2.LeaseKeepAliveRequest(ID=lease_id)
        return await self._call("LeaseKeepAliveOnce", req, route=LEADER, mutation=False, timeout=timeout)

    def open_keep_alive_stream(self):
        """A LeaseKeepAlive stream to the member believed to lead (a Lease's keep-alives ride on it)."""
        eps = self._endpoints
        creds = self._credentials  # the grant before it authenticated this client, when auth is on
        return eps.conn(eps.leader or eps.first()).lease_keep_alive(
            metadata=creds.metadata if creds is not None else None)

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False,
                                 timeout: float | None = None) -> LeaseTimeToLive:
        """Seconds left on a lease (-1: no such lease), its granted TTL, and with ``keys`` its keys."""
        req = lease_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=keys)
        resp = await self._call("LeaseTimeToLive", req, route=LEADER, mutation=False, timeout=timeout)
        return LeaseTimeToLive(resp.ID, resp.TTL, resp.grantedTTL, list(resp.keys))

    async def leases(self, *, timeout: float | None = None) -> list[int]:
        """The ids of every lease."""
        resp = await self._call("LeaseLeases", lease_pb2.LeaseLeasesRequest(), route=LEADER, mutation=False,
                                timeout=timeout)
        return [ls.ID for ls in resp.leases]

    # --- Cluster -----------------------------------------------------------

    async def compact(self, revision: int, *, timeout: float | None = None) -> int:
        """Discard the history below ``revision`` (etcd's compact); the store's revision after it.

        ``Compacted`` if it already is compacted that far, ``FutureRevision`` past the current revision.
        """
        resp = await self._call("Compact", kv_pb2.CompactionRequest(revision=revision), route=LEADER,
                                mutation=False, timeout=timeout)  # no session: a retry after it applied
        # is refused as compacted
        return resp.header.revision

    def watch(
        self, key: BytesLike, end: BytesLike | None = None, *, prefix: bool = False, start_revision: int = 0,
        prev_kv: bool = False, no_put: bool = False, no_delete: bool = False, progress_notify: bool = False,
        position: WatchPosition | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """``async for ev in client.watch(b"cfg/", prefix=True)``: every change from ``start_revision``
        on (0: from now), in revision order, resumed on another member if one fails (watch.py).
        Ends with ``WatchCompacted`` if the history it needs is gone."""
        req = range_request(key, end, prefix=prefix)
        return watch_events(self._endpoints, req.key, req.range_end, start_revision, prev_kv=prev_kv,
                            no_put=no_put, no_delete=no_delete, progress_notify=progress_notify,
                            position=position, before_connect=self._authenticated)

    async def _authenticated(self) -> None:
        """Authenticate now if this client has credentials and has not yet (a watch carries the token)."""
        creds = self._credentials
        if creds is not None and creds.generation == 0:
            await creds.renew(0, self._authenticate)

    async def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> MemberStatus:
        """Status of ``endpoint``, or of the leader (else whichever member answers)."""
        route = self._endpoints.learn(endpoint) if endpoint else LEADER
        resp, addr = await self._call(
            "Status", _STATUS_REQ, route=route, mutation=False, timeout=timeout, with_addr=True
        )
        return MemberStatus(
            addr, resp.member_id, resp.role, resp.term, resp.leader_id, resp.commit_index, resp.applied_index,
            resp.wal_size, resp.db_size, resp.snapshot_index, resp.version, resp.header.revision,
            tuple(resp.errors),
        )

    async def status_all(self, *, timeout: float | None = None) -> dict[str, MemberStatus | errors.KvstoreError]:
        """Status of every known member at once; a member that fails maps to its error."""
        addrs = list(self._endpoints.addrs)
        results = await asyncio.gather(*(self.status(a, timeout=timeout) for a in addrs), return_exceptions=True)
        out: dict[str, MemberStatus | errors.KvstoreError] = {}
        for a, r in zip(addrs, results):
            if isinstance(r, BaseException) and not isinstance(r, errors.KvstoreError):
                raise r
            out[a] = r
        return out

    async def hash_kv(self, index: int = 0, endpoint: str | None = None, *,
                      timeout: float | None = None) -> tuple[str, maintenance_pb2.HashKVResponse]:
        """A member's key/value hash at the hash barrier at log `index` (0: the leader places a new
        barrier and answers with its own hash); (the member's address, its answer)."""
        route = self._endpoints.learn(endpoint) if endpoint else LEADER
        resp, addr = await self._call("HashKV", maintenance_pb2.HashKVRequest(index=index), route=route,
                                      mutation=False, timeout=timeout, with_addr=True)
        return addr, resp

    async def alarms(self, disarm: bool = False, member_id: int = 0, alarm: str = "", *,
                     timeout: float | None = None) -> list[tuple[int, str]]:
        """The active alarms as (member_id, alarm); with disarm, first clear the given ones (0/"": all)."""
        req = maintenance_pb2.AlarmRequest(
            action=maintenance_pb2.AlarmRequest.DEACTIVATE if disarm else maintenance_pb2.AlarmRequest.GET,
            member_id=member_id, alarm=alarm)
        resp = await self._call("Alarm", req, route=LEADER, mutation=False, timeout=timeout)
        return [(a.member_id, a.alarm) for a in resp.alarms]

    async def members(self, *, timeout: float | None = None) -> list[Member]:
        """The cluster's members (and learn their client addresses)."""
        resp = await self._call("MemberList", _MEMBERS_REQ, route=LEADER, mutation=False, timeout=timeout)
        self._endpoints.update(resp)
        return [_member(m) for m in resp.members]

    async def member_add(self, peer_urls: list[str], client_urls: list[str] | None = None, *, learner: bool = False,
                         name: str = "", timeout: float | None = None) -> tuple[Member, list[Member]]:
        """Add a member (a learner with ``learner``); (the new member with its id, every member after)."""
        req = cluster_pb2.MemberAddRequest(peer_urls=peer_urls, client_urls=client_urls or [], is_learner=learner,
                                           name=name)
        resp = await self._call("MemberAdd", req, route=LEADER, mutation=False, timeout=timeout)
        return _member(resp.member), self._learn_members(resp)

    async def member_remove(self, member_id: int, *, timeout: float | None = None) -> list[Member]:
        req = cluster_pb2.MemberRemoveRequest(id=member_id)
        return self._learn_members(await self._call("MemberRemove", req, route=LEADER, mutation=False, timeout=timeout))

    async def member_promote(self, member_id: int, *, timeout: float | None = None) -> list[Member]:
        req = cluster_pb2.MemberPromoteRequest(id=member_id)
        return self._learn_members(await self._call("MemberPromote", req, route=LEADER, mutation=False,
                                                    timeout=timeout))

    async def member_update(self, member_id: int, peer_urls: list[str], *, timeout: float | None = None) -> list[Member]:
        req = cluster_pb2.MemberUpdateRequest(id=member_id, peer_urls=peer_urls)
        return self._learn_members(await self._call("MemberUpdate", req, route=LEADER, mutation=False,
                                                    timeout=timeout))

    def _learn_members(self, resp: Any) -> list[Member]:
        """Follow the member list a change answered with (new endpoints in, removed ones out)."""
        self._endpoints.update(cluster_pb2.MemberListResponse(members=resp.members))
        return [_member(m) for m in resp.members]

    async def transfer_leader(self, target: int = 0, *, timeout: float | None = None) -> int:
        """Hand leadership to member ``target`` (0: the most up-to-date other member); returns the new leader id."""
        req = cluster_pb2.TransferLeadershipRequest(target_id=target)
        resp = await self._call("TransferLeadership", req, route=LEADER, mutation=False, timeout=timeout)
        eps = self._endpoints
        if resp.leader_id in eps.ids:
            eps.set_leader(eps.ids[resp.leader_id], resp.leader_id)
        else:
            eps.forget_leader()
        return int(resp.leader_id)

    # --- the call path -----------------------------------------------------

    async def _wait(self, fut: asyncio.Future[Any], timeout: float | None, mutation: bool) -> Any:
        """Await a coalesced op; an explicit per-call timeout is enforced on this caller alone."""
        if timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                0, {"batch": "the batch carrying this op did not finish in time"},
                timeout=timeout, maybe_applied=mutation,
            ) from None

    async def _call(
        self,
        method: str,
        request: Any,
        *,
        route: str,
        mutation: bool,
        timeout: float | None,
        with_addr: bool = False,
    ) -> Any:
        """Send one request with redirects and retries until it succeeds or the deadline passes.

        ``route`` is LEADER, ANY (balanced, for serializable reads) or one
        fixed address. Endpoints tried since the last backoff are remembered:
        moving on to an untried one (or following a redirect) is immediate,
        coming back to a tried one first waits ``retry.backoff(n)``. A member
        that refused, broke or stayed silent is skipped while its circuit is
        open (breaker.py), and every retry takes from the retry budget
        (retry_budget.py); following a redirect is not a retry.
        """
        if self._closed:
            raise errors.ClientClosed("client is closed")
        policy = self.retry
        total = timeout if timeout is not None else (policy.deadline or self.timeout)
        loop_time = asyncio.get_running_loop().time
        deadline = loop_time() + total
        eps = self._endpoints
        breaker = eps.breaker
        budget = self.retry_budget
        session = self.session
        balancer = self._balancer
        streamed = self._streamed
        creds = None if method in _NO_TOKEN else self._credentials
        renewals = 0
        generation = 0
        if creds is not None and creds.generation == 0:
            await creds.renew(0, self._authenticate)  # the first call: authenticate first
        seq = 0
        rid = None
        if mutation:
            seq = session.begin()
            rid = request.request_id
            rid.client_id = session.client_id
            rid.seq = seq
        causes: dict[str, str] = {}
        tried: set[str] = set()
        attempts = 0
        waits = 0
        leader_before: str | None = None  # the client's leader hint when the last attempt started
        maybe_applied = False
        redirected = False  # the next attempt follows a redirect (not a retry)
        may_have_arrived = False  # as maybe_applied, but a call gRPC never sent does not count
        if route is LEADER:
            addr = eps.first()
        elif route is ANY:
            addr = balancer.pick(eps.addrs)
        else:
            addr = route
        budget.request()
        try:
            if seq > 1:
                await session.wait_opened(seq)
            while True:
                remaining = deadline - loop_time()
                if remaining <= 0 or not policy.may_attempt(attempts):
                    break
                if breaker.is_open(addr):
                    # Its circuit is open: skip it without an attempt, as if it had failed.
                    tried.add(addr)
                    causes.setdefault(addr, "circuit open: it refused, broke or stayed silent just before")
                    addr = self._next_addr(route, addr, tried)
                    if addr not in tried:
                        continue
                elif attempts and not redirected and not budget.try_retry():
                    # This client has retried too much lately: wait (not fail) until the
                    # budget allows again or the deadline passes.
                    causes[BUDGET_CAUSE] = "retries held back: the client's retry budget was spent"
                else:
                    breaker.allow(addr)  # half-open: this attempt is the probe
                    redirected = False
                    attempts += 1
                    leader_before = eps.leader
                    if rid is not None:
                        rid.acked_below = session.acked_below
                        if seq == 1:
                            rid.opens_session = session.opens(seq, may_have_arrived)
                    conn = eps.conn(addr)
                    kind = streamed.get(method)
                    call_md = None
                    if creds is not None:
                        generation, call_md = creds.generation, creds.metadata
                    # The call's deadline cuts this attempt short: its timing out says nothing about the member.
                    cut = remaining < policy.attempt_timeout
                    attempt_timeout = remaining if cut else policy.attempt_timeout
                    if route is ANY:
                        balancer.started(addr)
                    try:
                        if kind is not None:
                            resp = await conn.stream().call(kind, request, attempt_timeout)
                        else:
                            resp = await conn.methods[method](request, timeout=attempt_timeout, metadata=call_md)
                        if self._drop_reply is not None and self._drop_reply(method, request):
                            raise _LostReply()
                    except AttemptFailed as e:
                        code = e.code
                        details = e.details
                        md = e.metadata
                        unreachable = e.unreachable
                    except grpc.aio.AioRpcError as e:
                        code = e.code()
                        details = e.details() or ""
                        md = _metadata(e)
                        unreachable = not md and code in _UNREACHABLE
                    except _LostReply:
                        code = grpc.StatusCode.UNAVAILABLE
                        details = "reply lost (test fault hook)"
                        md = {}
                        unreachable = False
                    else:
                        breaker.success(addr)
                        if route is LEADER and eps.leader != addr:
                            eps.set_leader(addr)
                        if attempts > 1 and log.isEnabledFor(logging.DEBUG):
                            log.debug("%s answered by %s at attempt %d", method, addr, attempts)
                        return (resp, addr) if with_addr else resp
                    finally:
                        if route is ANY:
                            balancer.finished(addr)

                    if self._closed:
                        raise errors.ClientClosed("client closed during the call")
                    if not (cut and code is grpc.StatusCode.DEADLINE_EXCEEDED and addr in causes):
                        causes[addr] = f"{code.name}: {details}"  # else keep why it failed when it had time
                    tried.add(addr)
                    leader_addr = md.get(MD_LEADER_ADDR)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("%s to %s failed: %s: %s", method, addr, code.name, details)
                    if unreachable and not (cut and code is grpc.StatusCode.DEADLINE_EXCEEDED):
                        # Refused, broken, or silent for a whole attempt (paused, partitioned):
                        # open its circuit; a silent one for at least as long again.
                        silent = code is grpc.StatusCode.DEADLINE_EXCEEDED
                        breaker.failure(addr, policy.attempt_timeout if silent else 0.0)
                    if leader_addr:
                        # A follower named the leader: certainly not applied; go there
                        # now, unless that member just failed us (a paused or dead
                        # leader is still named until the election ends).
                        leader_addr = eps.learn(leader_addr)
                        eps.set_leader(leader_addr, int(md.get(MD_LEADER_ID, "0") or 0))
                        self._refresh_members_soon()
                        if route is LEADER:
                            if leader_addr not in tried and not eps.penalized(leader_addr):
                                addr = leader_addr
                                redirected = True
                                continue
                            addr = eps.next_untried(addr, tried)
                            if addr not in tried:
                                continue
                    elif code is grpc.StatusCode.UNAUTHENTICATED and creds is not None and renewals < 2:
                        # No token yet, or it expired or went stale: authenticate and try again at
                        # once (refused before anything was proposed, so not a retry).
                        renewals += 1
                        try:
                            await creds.renew(generation, self._authenticate)
                        except errors.KvstoreError as renew_error:
                            if mutation:  # an earlier attempt of this call may have been applied
                                renew_error.maybe_applied = maybe_applied  # type: ignore[attr-defined]
                            raise
                        tried.discard(addr)
                        redirected = True
                        continue
                    elif not policy.is_retryable(code) or errors.is_final(code, details):
                        err = errors.from_status(code, details, addr)
                        if isinstance(err, errors.SessionExpired):
                            err.maybe_applied = maybe_applied  # this attempt was refused, an earlier one may not be
                            self._session_expired(session.client_id)
                        elif mutation and isinstance(err, errors.Unauthenticated | errors.PermissionDenied):
                            err.maybe_applied = maybe_applied  # likewise
                        if seq == 1 and not may_have_arrived:
                            self._session_unopened(session.client_id)
                        raise err
                    else:
                        if mutation and md.get(MD_NOT_APPLIED) != "1":
                            maybe_applied = True
                            may_have_arrived = may_have_arrived or not _never_sent(code, details)
                        if route is LEADER:
                            eps.forget_leader(addr)
                        addr = self._next_addr(route, addr, tried)
                        if addr not in tried:
                            continue
                # Every endpoint in sight has failed since the last wait: back off, and
                # at least until the first circuit in sight is due for its probe.
                candidates = eps.addrs if route is LEADER or route is ANY else [addr]
                pause = min(max(policy.backoff(waits), breaker.wait(candidates)), deadline - loop_time())
                waits += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: every endpoint failed since the last wait; waiting %.0f ms", method, pause * 1000)
                tried.clear()
                if pause > 0:
                    await asyncio.sleep(pause)
                if route is LEADER and attempts:
                    # Another call found the leader meanwhile: going there is following a
                    # redirect, not a retry (only a change of leader counts, so it cannot storm).
                    leader = eps.leader
                    if leader is not None and leader != leader_before and not eps.penalized(leader):
                        addr = leader
                        redirected = True
        finally:
            if mutation:
                session.finish(seq)
        if not policy.may_attempt(attempts) and deadline - loop_time() > 0:
            raise errors.NoEndpointAnswered(attempts, causes, maybe_applied=maybe_applied)
        raise errors.DeadlineExceeded(attempts, causes, timeout=total, maybe_applied=maybe_applied)

    async def _authenticate(self, user: str, password: str) -> str | None:
        """A new token for ``user`` (Authenticate goes to the leader, which has every user change);
        None while auth is disabled."""
        req = auth_pb2.AuthenticateRequest(name=user, password=password)
        try:
            resp = await self._call("Authenticate", req, route=LEADER, mutation=False, timeout=None)
        except errors.FailedPrecondition as e:
            if AUTH_NOT_ENABLED in e.message:
                return None
            raise
        return str(resp.token)

    def _next_addr(self, route: str, addr: str, tried: set[str]) -> str:
        """Where a failed (or skipped) call goes next: an untried member whose circuit is closed, if any."""
        eps = self._endpoints
        if route is LEADER:
            return eps.next_untried(addr, tried)
        if route is ANY:
            untried = [a for a in eps.addrs if a not in tried and not eps.penalized(a)]
            return self._balancer.pick(untried or eps.addrs)
        return addr

    def _session_expired(self, client_id: int) -> None:
        """The cluster refused a request of session ``client_id`` as expired: later calls
        go out under a new session (calls already under way finish on the old one)."""
        if self.session.client_id == client_id:
            log.info("session %d expired on the cluster; starting a new session", client_id)
            self.session = Session()

    def _session_unopened(self, client_id: int) -> None:
        """Seq 1 of session ``client_id``, the request that opens it on the cluster, was refused
        before it was applied anywhere (a permission, a limit): later requests of that session
        would find none and be refused as expired, so they go out under a new session."""
        if self.session.client_id == client_id:
            log.debug("session %d never opened (its first request was refused); starting a new session", client_id)
            self.session = Session()

    def _refresh_members_soon(self) -> None:
        """After a redirect, re-read the member list in the background (at most once a second)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._refresh_task is not None or now - self._last_refresh < 1.0 or self._closed:
            return
        self._last_refresh = now

        async def refresh() -> None:
            try:
                await self.members(timeout=min(self.timeout, 2.0))
            except Exception:  # a hint only: the next redirect tries again
                pass
            finally:
                self._refresh_task = None

        self._refresh_task = loop.create_task(refresh())


def _member(m: cluster_pb2.Member) -> Member:
    return Member(m.id, m.name, list(m.peer_urls), list(m.client_urls), m.is_learner)
