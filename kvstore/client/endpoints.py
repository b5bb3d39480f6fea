"""Known endpoints, their channels, and the cached leader.

One gRPC channel (and one set of stubs) per member for the client's whole
life: creating a channel costs a TCP and HTTP/2 handshake, so it never happens
on the per-call path. The endpoint list starts with what the user gave and
grows with the client addresses the cluster reports (redirects, MemberList).
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from kvstore.client.breaker import CircuitBreaker
from kvstore.client.stream import SessionStream
from kvstore.v1 import (
    auth_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    kv_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    maintenance_pb2_grpc,
)

from .credentials import Credentials
from .tls import TLS

__all__ = ["Endpoints", "Connection", "DEFAULT_ENDPOINTS", "normalize", "DEFAULT_CHANNEL_OPTIONS"]

#: The Auth service's RPCs, callable by name through Connection.methods.
AUTH_METHODS: tuple[str, ...] = (
    "AuthEnable", "AuthDisable", "AuthStatus", "Authenticate", "UserAdd", "UserGet", "UserList", "UserDelete",
    "UserChangePassword", "UserGrantRole", "UserRevokeRole", "RoleAdd", "RoleGet", "RoleList", "RoleDelete",
    "RoleGrantPermission", "RoleRevokePermission",
)

DEFAULT_ENDPOINTS: tuple[str, ...] = ("127.0.0.1:2379", "127.0.0.1:2479", "127.0.0.1:2579")

#: gRPC's default reconnect backoff grows to two minutes, which would keep a
#: restarted member unreachable long after it is back; the client has its own
#: retry policy, so the channel only needs to reconnect promptly.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
)


def normalize(addr: str) -> str:
    """``host:port`` from an address that may carry a scheme (``http://h:p``)."""
    addr = addr.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme):]
    return addr.rstrip("/")


async def keep_alive_once(open_stream: Any, request: lease_pb2.LeaseKeepAliveRequest, *,
                          timeout: float, metadata: Any = None) -> lease_pb2.LeaseKeepAliveResponse:
    """One keep-alive on a stream of its own (the unary shape the retrying call path takes); metadata
    carries the caller's auth token, as on every other call."""
    call = open_stream(timeout=timeout, metadata=metadata)
    try:
        await call.write(request)
        await call.done_writing()
        resp = await call.read()
        if resp is grpc.aio.EOF:  # ended without an error status (a failed stream raises from read)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "the keep-alive stream ended without an answer")
        return resp
    finally:
        call.cancel()


class Connection:
    """A channel to one member with its stubs' bound methods, looked up by RPC name, and its session stream."""

    __slots__ = ("addr", "channel", "methods", "lease_keep_alive", "_streams", "_turn", "_turn_held", "_credentials",
                 "_retiring")

    def __init__(self, addr: str, options: Sequence[tuple[str, Any]], streams: int = 1,
                 tls: TLS | None = None, credentials: Credentials | None = None) -> None:
        self.addr = addr
        self._credentials = credentials
        self._retiring: list[SessionStream] = []  # opened with an older token, closed once idle
        if tls is None:
            self.channel = grpc.aio.insecure_channel(addr, options=list(options))
        else:
            self.channel = grpc.aio.secure_channel(addr, tls.credentials(), options=list(options))
        kv = kv_pb2_grpc.KVStub(self.channel)
        cl = cluster_pb2_grpc.ClusterStub(self.channel)
        mt = maintenance_pb2_grpc.MaintenanceStub(self.channel)
        ls = lease_pb2_grpc.LeaseStub(self.channel)
        self.lease_keep_alive = ls.LeaseKeepAlive  # a stream (see kvstore/client/lease.py)
        self.methods: dict[str, Any] = {
            "Range": kv.Range,
            "Put": kv.Put,
            "DeleteRange": kv.DeleteRange,
            "Txn": kv.Txn,
            "Batch": kv.Batch,
            "Compact": kv.Compact,
            "Status": cl.Status,
            "MemberList": cl.MemberList,
            "TransferLeadership": cl.TransferLeadership,
            "MemberAdd": cl.MemberAdd,
            "MemberRemove": cl.MemberRemove,
            "MemberUpdate": cl.MemberUpdate,
            "MemberPromote": cl.MemberPromote,
            "HashKV": mt.HashKV,
            "Alarm": mt.Alarm,
            "LeaseGrant": ls.LeaseGrant,
            "LeaseRevoke": ls.LeaseRevoke,
            "LeaseTimeToLive": ls.LeaseTimeToLive,
            "LeaseLeases": ls.LeaseLeases,
            "LeaseKeepAliveOnce": functools.partial(keep_alive_once, ls.LeaseKeepAlive),
        }
        auth = auth_pb2_grpc.AuthStub(self.channel)
        for name in AUTH_METHODS:
            self.methods[name] = getattr(auth, name)
        self._streams: list[SessionStream | None] = [None] * streams
        self._turn = 0
        self._turn_held = False  # the turn moves on when the event-loop turn ends

    def stream(self) -> SessionStream:
        """A session stream to this member (the next in turn); a new one where there is none or it broke.

        The turn moves on once per event-loop turn: calls made together (callers woken by one answer
        message) share a stream, and so a message, as a coalesced batch would.
        """
        i = self._turn
        if not self._turn_held:
            self._turn_held = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        s: SessionStream | None = self._streams[i]
        creds = self._credentials
        if creds is not None:
            if self._retiring:
                self._retire_idle()
            if s is not None and not s.broken and s.generation != creds.generation:
                self._retiring.append(s)  # its token is stale: finish what it carries, then close it
                s = None
        if s is None or s.broken:
            if creds is None:
                s = SessionStream(self.channel)
            else:
                s = SessionStream(self.channel, metadata=creds.metadata, generation=creds.generation)
            self._streams[i] = s
        return s

    def _next_turn(self) -> None:
        self._turn = (self._turn + 1) % len(self._streams)
        self._turn_held = False

    def _retire_idle(self) -> None:
        keep = []
        for s in self._retiring:
            if s.in_flight or s.broken:
                if not s.broken:
                    keep.append(s)
                continue
            s.close()
        self._retiring = keep

    def close_streams(self) -> None:
        for old in self._retiring:
            old.close()
        self._retiring = []
        for s in self._streams:
            if s is not None:
                s.close()
        self._streams = [None] * len(self._streams)


class Endpoints:
    """The member addresses this client knows, and which one it believes leads.

    ``leader`` is a hint: set from a successful leader-only call or a redirect,
    dropped when that member fails. Only touched from the client's event loop.
    """

    def __init__(
        self,
        addrs: Iterable[str],
        options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        breaker: CircuitBreaker | None = None,
        streams_per_member: int = 1,
        tls: TLS | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if streams_per_member < 1:
            raise ValueError("streams_per_member must be >= 1")
        self.streams_per_member = streams_per_member
        addrs = list(addrs)
        if tls is None and any(a.strip().startswith("https://") for a in addrs):
            tls = TLS()  # https:// without TLS settings: the system's root CAs, no client certificate
        if tls is not None:
            tls.credentials()  # a file that cannot be read fails here, named, not at the first call
        self.tls = tls
        self.credentials = credentials
        self._addrs: list[str] = []
        for a in addrs:
            self.learn(a)
        if not self._addrs:
            raise ValueError("at least one endpoint is needed")
        self._options = tuple(options)
        self._conns: dict[str, Connection] = {}
        self.leader: str | None = None
        self.leader_id = 0
        self.ids: dict[int, str] = {}  # member id -> client address
        self._start = 0
        self.breaker = breaker if breaker is not None else CircuitBreaker()

    @property
    def addrs(self) -> list[str]:
        return self._addrs

    def __len__(self) -> int:
        return len(self._addrs)

    def learn(self, addr: str) -> str:
        """Add an address if new; returns it normalised."""
        addr = normalize(addr)
        if addr and addr not in self._addrs:
            self._addrs.append(addr)
        return addr

    def conn(self, addr: str) -> Connection:
        c = self._conns.get(addr)
        if c is None:
            c = self._conns[addr] = Connection(addr, self._options, self.streams_per_member, self.tls,
                                                      self.credentials)
        return c

    def first(self) -> str:
        """Where a leader-only call starts: the cached leader, else the next member in turn."""
        if self.leader is not None and not self.penalized(self.leader):
            return self.leader
        i = self._start
        self._start = i + 1
        n = len(self._addrs)
        for k in range(n):
            a = self._addrs[(i + k) % n]
            if not self.penalized(a):
                return a
        return self._addrs[i % n]

    def after(self, addr: str) -> str:
        """The endpoint after ``addr`` in the list (wrapping)."""
        try:
            i = self._addrs.index(addr)
        except ValueError:
            return self._addrs[0]
        return self._addrs[(i + 1) % len(self._addrs)]

    def next_untried(self, addr: str, tried: set[str]) -> str:
        """The next endpoint after ``addr`` not yet tried and not penalized.

        When there is none, the next one not penalized (already tried: the
        caller backs off before using it), else simply the next one.
        """
        a = addr
        fallback = None
        for _ in range(len(self._addrs)):
            a = self.after(a)
            if self.penalized(a):
                continue
            if a not in tried:
                return a
            if fallback is None:
                fallback = a
        return fallback if fallback is not None else self.after(addr)

    def penalized(self, addr: str) -> bool:
        """Calls skip ``addr`` for now: its circuit is open (it refused, broke or stayed silent)."""
        return self.breaker.is_open(addr)

    def set_leader(self, addr: str, member_id: int = 0) -> None:
        self.leader = addr
        if member_id:
            self.leader_id = member_id
            self.ids[member_id] = addr

    def forget_leader(self, addr: str | None = None) -> None:
        """Drop the leader hint (only if it still names ``addr``, when given)."""
        if addr is None or self.leader == addr:
            self.leader = None
            self.leader_id = 0

    def update(self, resp: cluster_pb2.MemberListResponse) -> None:
        """Learn every member's client address and the current leader from a MemberList; forget the
        addresses of members it no longer lists (removed)."""
        listed = {m.id for m in resp.members}
        for gone in [i for i in self.ids if i not in listed] if listed else []:
            addr = self.ids.pop(gone)
            if addr in self._addrs and len(self._addrs) > 1:
                self._addrs.remove(addr)
            if self.leader == addr:
                self.forget_leader()
        for m in resp.members:
            if m.client_urls:
                self.ids[m.id] = self.learn(m.client_urls[0])
        if resp.leader_id and resp.leader_id in self.ids:
            self.set_leader(self.ids[resp.leader_id], resp.leader_id)

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        for c in conns.values():
            c.close_streams()
            await c.channel.close()
