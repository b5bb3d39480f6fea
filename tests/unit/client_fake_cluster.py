"""A fault-injecting fake cluster for client tests: real grpc.aio servers, no Raft.

Each node is a real gRPC server on 127.0.0.1 speaking the kvstore.v1 KV and
Cluster APIs over one shared in-memory state machine (so "replication" is
instant). It follows the server contracts the client relies on — redirects
with leader metadata, "no leader", ``kvstore-not-applied``, exactly-once by
(client_id, seq), per-op Batch errors, limits as INVALID_ARGUMENT — and lets a
test break things: fail the next calls, lose replies after applying, hang, or
go down entirely. The session stream is the real server's stream code
(``SessionStream``) over the same handlers, so every fault applies per request
on a stream too. Servers run on their own event-loop thread so both the
blocking and the asyncio client can be tested against them.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvstore.server.errors import RequestFailed
from kvstore.server.main import KEEPALIVE_SERVER_OPTIONS
from kvstore.server.session_stream import SessionStream
from kvstore.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

MUTATIONS = {"Put", "DeleteRange", "Txn"}


@dataclass
class Fault:
    code: grpc.StatusCode
    details: str
    metadata: tuple[tuple[str, str], ...] = ()


class StateMachine:
    """A tiny etcd-like store: revisions, versions, compares, dedup by RequestId."""

    def __init__(self) -> None:
        self.data: dict[bytes, kv_pb2.KeyValue] = {}
        self.revision = 0
        self.answers: dict[tuple[int, int], Any] = {}
        self.applied: dict[tuple[int, int], int] = {}  # times each RequestId was applied
        self.forgotten_below: dict[int, int] = {}

    def header(self, node: FakeNode) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(cluster_id=1, member_id=node.member_id, revision=self.revision, raft_term=2)

    def dedup(self, rid: kv_pb2.RequestId, apply) -> Any:  # type: ignore[no-untyped-def]
        if not rid.client_id:
            return apply()
        key = (rid.client_id, rid.seq)
        if key in self.answers:
            return self.answers[key]
        resp = apply()
        self.answers[key] = resp
        self.applied[key] = self.applied.get(key, 0) + 1
        # Forget answers the client has acknowledged.
        self.forgotten_below[rid.client_id] = max(self.forgotten_below.get(rid.client_id, 0), rid.acked_below)
        for k in [k for k in self.answers if k[0] == rid.client_id and k[1] < rid.acked_below]:
            del self.answers[k]
        return resp

    def keys_in(self, key: bytes, end: bytes) -> list[bytes]:
        if not end:
            return [key] if key in self.data else []
        return sorted(k for k in self.data if k >= key and (end == b"\0" or k < end))

    def range(self, node: FakeNode, r: kv_pb2.RangeRequest) -> kv_pb2.RangeResponse:
        keys = self.keys_in(r.key, r.range_end)
        resp = kv_pb2.RangeResponse(header=self.header(node), count=len(keys))
        if r.count_only:
            return resp
        if r.limit and len(keys) > r.limit:
            keys, resp.more = keys[: r.limit], True
        for k in keys:
            kv = resp.kvs.add()
            kv.CopyFrom(self.data[k])
            if r.keys_only:
                kv.value = b""
        return resp

    def put(self, node: FakeNode, p: kv_pb2.PutRequest, bump: bool = True) -> kv_pb2.PutResponse:
        if bump:
            self.revision += 1
        old = self.data.get(p.key)
        resp = kv_pb2.PutResponse()
        if p.prev_kv and old is not None:
            resp.prev_kv.CopyFrom(old)
        self.data[p.key] = kv_pb2.KeyValue(
            key=p.key, value=p.value, mod_revision=self.revision,
            create_revision=old.create_revision if old else self.revision,
            version=(old.version + 1) if old else 1,
        )
        resp.header.CopyFrom(self.header(node))
        return resp

    def delete(self, node: FakeNode, d: kv_pb2.DeleteRangeRequest, bump: bool = True) -> kv_pb2.DeleteRangeResponse:
        keys = self.keys_in(d.key, d.range_end)
        if keys and bump:
            self.revision += 1
        resp = kv_pb2.DeleteRangeResponse(deleted=len(keys))
        for k in keys:
            old = self.data.pop(k)
            if d.prev_kv:
                resp.prev_kvs.append(old)
        resp.header.CopyFrom(self.header(node))
        return resp

    def compare(self, c: kv_pb2.Compare) -> bool:
        kv = self.data.get(c.key)
        C = kv_pb2.Compare
        if c.target == C.VALUE:
            if kv is None:
                return False
            a, b = kv.value, c.value
        else:
            field_ = {C.VERSION: "version", C.CREATE: "create_revision", C.MOD: "mod_revision"}[c.target]
            a, b = (getattr(kv, field_) if kv else 0), getattr(c, field_)
        return {C.EQUAL: a == b, C.NOT_EQUAL: a != b, C.GREATER: a > b, C.LESS: a < b}[c.result]

    def txn(self, node: FakeNode, t: kv_pb2.TxnRequest) -> kv_pb2.TxnResponse:
        ok = all(self.compare(c) for c in t.compare)
        ops = t.success if ok else t.failure
        writes = any(o.WhichOneof("request") != "request_range" for o in ops)
        if writes:
            self.revision += 1
        resp = kv_pb2.TxnResponse(succeeded=ok)
        for o in ops:
            resp.responses.append(self.op(node, o, bump=False))
        resp.header.CopyFrom(self.header(node))
        return resp

    def op(self, node: FakeNode, o: kv_pb2.RequestOp, bump: bool = True) -> kv_pb2.ResponseOp:
        which = o.WhichOneof("request")
        if which == "request_put":
            return kv_pb2.ResponseOp(response_put=self.put(node, o.request_put, bump))
        if which == "request_range":
            return kv_pb2.ResponseOp(response_range=self.range(node, o.request_range))
        if which == "request_delete_range":
            return kv_pb2.ResponseOp(response_delete_range=self.delete(node, o.request_delete_range, bump))
        return kv_pb2.ResponseOp(response_txn=self.txn(node, o.request_txn))


@dataclass
class FakeNode:
    member_id: int
    cluster: FakeCluster
    port: int = 0
    server: grpc.aio.Server | None = None
    faults: list[Fault] = field(default_factory=list)
    drop_replies: int = 0  # apply, then answer UNAVAILABLE (reply lost), this many times
    hang: bool = False  # never answer (like a SIGSTOPped process)
    delay: float = 0.0  # seconds each KV request waits before it is served (or redirected)
    hang_after_apply: bool = False  # apply writes, then never answer them
    read_op_errors: int = 0  # fail this many reads inside Batches with a per-op UNAVAILABLE
    calls: dict[str, int] = field(default_factory=dict)
    streams_opened: int = 0
    session_streams: list[Any] = field(default_factory=list)
    requests: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_leader(self) -> bool:
        return self.cluster.leader_id == self.member_id

    async def handle(self, method: str, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.requests.append((method, type(req).FromString(req.SerializeToString())))
        if self.hang:
            await asyncio.sleep(3600)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.faults:
            f = self.faults.pop(0)
            await ctx.abort(f.code, f.details, trailing_metadata=f.metadata)
        sm = self.cluster.sm
        needs_leader = method in MUTATIONS or method == "Batch" or (method == "Range" and not req.serializable)
        if needs_leader and not self.is_leader:
            leader = self.cluster.leader
            if leader is None:
                await ctx.abort(grpc.StatusCode.UNAVAILABLE, "no leader", trailing_metadata=(("kvstore-not-applied", "1"),))
            await ctx.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"not leader: leader is member {leader.member_id} at {leader.addr}",
                trailing_metadata=(
                    ("kvstore-leader-id", str(leader.member_id)),
                    ("kvstore-leader-addr", leader.addr),
                    ("kvstore-not-applied", "1"),
                ),
            )
        if method == "Range":
            resp = sm.range(self, req)
        elif method == "Put":
            resp = sm.dedup(req.request_id, lambda: sm.put(self, req))
        elif method == "DeleteRange":
            resp = sm.dedup(req.request_id, lambda: sm.delete(self, req))
        elif method == "Txn":
            resp = sm.dedup(req.request_id, lambda: sm.txn(self, req))
        else:
            if len(req.ops) > self.cluster.max_batch_ops:
                await ctx.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"too many ops in batch: {len(req.ops)} > max_ops_per_batch {self.cluster.max_batch_ops}",
                    trailing_metadata=(("kvstore-not-applied", "1"),),
                )
            resp = sm.dedup(req.request_id, lambda: self.batch(req))
        if self.hang_after_apply and method != "Range":
            await asyncio.sleep(3600)
        if self.drop_replies > 0 and method != "Range":
            self.drop_replies -= 1
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (reply lost)")
        return resp

    def batch(self, req: kv_pb2.BatchRequest) -> kv_pb2.BatchResponse:
        sm = self.cluster.sm
        resp = kv_pb2.BatchResponse()
        for o in req.ops:
            r = resp.results.add()
            which = o.WhichOneof("request")
            key = getattr(o, which).key if which != "request_txn" else b""
            if which == "request_range" and self.read_op_errors > 0:
                self.read_op_errors -= 1
                r.error.code = grpc.StatusCode.UNAVAILABLE.value[0]
                r.error.message = "read index: leadership not confirmed in time"
            elif key.startswith(b"bad"):
                r.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                r.error.message = f"key {key!r} rejected: max key size"
            else:
                r.response.CopyFrom(sm.op(self, o))
        resp.header.CopyFrom(sm.header(self))
        return resp


class _KV(kv_pb2_grpc.KVServicer):
    def __init__(self, node: FakeNode) -> None:
        self.node = node

    async def Range(self, req, ctx):  # type: ignore[no-untyped-def]
        return await self.node.handle("Range", req, ctx)

    async def Put(self, req, ctx):  # type: ignore[no-untyped-def]
        return await self.node.handle("Put", req, ctx)

    async def DeleteRange(self, req, ctx):  # type: ignore[no-untyped-def]
        return await self.node.handle("DeleteRange", req, ctx)

    async def Txn(self, req, ctx):  # type: ignore[no-untyped-def]
        return await self.node.handle("Txn", req, ctx)

    async def Batch(self, req, ctx):  # type: ignore[no-untyped-def]
        return await self.node.handle("Batch", req, ctx)


    async def Session(self, requests, ctx):  # type: ignore[no-untyped-def]
        """The real server's stream code (SessionStream) over this fake's handlers."""
        node = self.node
        node.streams_opened += 1
        stream = SessionStream(self._stream_request, max_in_flight=node.cluster.max_stream_in_flight,
                               default_timeout=10.0)
        node.session_streams.append(stream)
        await ctx.send_initial_metadata(())
        await stream.run(requests, ctx.write)

    async def _stream_request(self, kind: str, req: Any, timeout: float, out: Any) -> None:
        out.CopyFrom(await self.node.handle(STREAM_METHODS[kind], req, _StreamContext()))


STREAM_METHODS = {"range": "Range", "put": "Put", "delete_range": "DeleteRange", "txn": "Txn", "batch": "Batch"}


class _StreamContext:
    """What a handler's ``ctx.abort`` becomes on a session stream: the error of that one request."""

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()) -> None:  # type: ignore[no-untyped-def]
        md = tuple(trailing_metadata or ())
        raise RequestFailed(
            code, details, not_applied=("kvstore-not-applied", "1") in md,
            metadata=tuple(kv for kv in md if kv[0] != "kvstore-not-applied"),
        )


class _Cluster(cluster_pb2_grpc.ClusterServicer):
    def __init__(self, node: FakeNode) -> None:
        self.node = node

    async def Status(self, req, ctx):  # type: ignore[no-untyped-def]
        n = self.node
        n.calls["Status"] = n.calls.get("Status", 0) + 1
        if n.hang:
            await asyncio.sleep(3600)
        if n.faults:
            f = n.faults.pop(0)
            await ctx.abort(f.code, f.details, trailing_metadata=f.metadata)
        return cluster_pb2.StatusResponse(
            header=n.cluster.sm.header(n), member_id=n.member_id,
            role="leader" if n.is_leader else "follower", term=2, leader_id=n.cluster.leader_id or 0,
            version="fake",
        )

    async def MemberList(self, req, ctx):  # type: ignore[no-untyped-def]
        n = self.node
        n.calls["MemberList"] = n.calls.get("MemberList", 0) + 1
        resp = cluster_pb2.MemberListResponse(header=n.cluster.sm.header(n), leader_id=n.cluster.leader_id or 0)
        for m in n.cluster.nodes:
            resp.members.add(id=m.member_id, name=f"n{m.member_id}", client_urls=[m.addr], peer_urls=["127.0.0.1:1"])
        return resp

    async def TransferLeadership(self, req, ctx):  # type: ignore[no-untyped-def]
        c = self.node.cluster
        if not self.node.is_leader:
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "not leader", trailing_metadata=(
                ("kvstore-leader-id", str(c.leader_id)), ("kvstore-leader-addr", c.leader.addr if c.leader else ""),
            ))
        target = req.target_id or next(m.member_id for m in c.nodes if m.member_id != c.leader_id)
        c.leader_id = target
        return cluster_pb2.TransferLeadershipResponse(header=c.sm.header(self.node), leader_id=target)


class FakeCluster:
    """N fake members on their own loop thread. Use as a context manager."""

    def __init__(
        self, n: int = 3, leader: int | None = 1, max_batch_ops: int = 1000, max_stream_in_flight: int = 1024,
        member_keepalive: bool = True,
    ) -> None:
        self.sm = StateMachine()
        self.max_stream_in_flight = max_stream_in_flight
        self.member_keepalive = member_keepalive  # the members' keepalive policy (off: gRPC's default)
        self.nodes = [FakeNode(i + 1, self) for i in range(n)]
        self.leader_id = leader
        self.max_batch_ops = max_batch_ops
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def leader(self) -> FakeNode | None:
        return next((m for m in self.nodes if m.member_id == self.leader_id), None)

    @property
    def endpoints(self) -> list[str]:
        return [m.addr for m in self.nodes]

    def node(self, member_id: int) -> FakeNode:
        return self.nodes[member_id - 1]

    def _do(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self, node: FakeNode) -> None:
        server = grpc.aio.server(options=KEEPALIVE_SERVER_OPTIONS if self.member_keepalive else None)
        kv_pb2_grpc.add_KVServicer_to_server(_KV(node), server)
        cluster_pb2_grpc.add_ClusterServicer_to_server(_Cluster(node), server)
        node.port = server.add_insecure_port(f"127.0.0.1:{node.port}")
        await server.start()
        node.server = server

    async def _stop(self, node: FakeNode) -> None:
        if node.server is not None:
            await node.server.stop(grace=None)
            node.server = None

    def start(self, member_id: int | None = None) -> None:
        for n in self.nodes if member_id is None else [self.node(member_id)]:
            self._do(self._start(n))

    def stop(self, member_id: int) -> None:
        """Take a member down: its port refuses connections until start()."""
        self._do(self._stop(self.node(member_id)))

    def total_calls(self, method: str) -> int:
        return sum(n.calls.get(method, 0) for n in self.nodes)

    def __enter__(self) -> FakeCluster:
        self._thread.start()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for n in self.nodes:
            n.hang = False
            self._do(self._stop(n))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
