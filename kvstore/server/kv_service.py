"""The client KV API: validate, then propose (writes) or confirm-and-read (reads).

Each handler checks the request against the limits before anything else, so
a bad request is refused (INVALID_ARGUMENT, `kvstore-not-applied: 1`) without
reaching raft. With auth enabled (auth_guard.py), the caller's token and
permissions are checked first: every op, including each op inside a txn and
each op of a Batch (which then fails alone); reads after their ReadIndex
confirmation, so they see every permission change acknowledged before them.
Writes go through `Node.propose` and are answered with the
state machine's result once applied; linearizable reads wait for a ReadIndex
confirmation; serializable reads are served by any member at once.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kvstore.storage.errors import ApplyError
from kvstore.storage.history import RevisionError
from kvstore.storage.errors import InvalidRequest as StorageInvalidRequest
from kvstore.storage.permissions import READ, WRITE, Denied, UserPermissions
from kvstore.storage.leases import LEASE_NOT_FOUND, missing_lease
from kvstore.storage.plain_puts import PlainPuts
from kvstore.storage.validation import check_op as storage_check_op
from kvstore.v1 import command_pb2, kv_pb2, kv_pb2_grpc

from .auth_guard import AuthGuard, permission_denied
from .errors import RequestFailed, invalid_argument
from .grpc_metrics import GRPC_STATS
from .limits import InvalidRequest, Limits, is_mutation
from .node import Node
from .session_stream import SessionStream

log = logging.getLogger("kvstore.kv")


def handles_errors(method):
    """Turn RequestFailed / InvalidRequest into a gRPC status with its trailing metadata.

    Also counts the call and its handling time by status code (grpc_metrics.py).
    """
    service = "kvstore.v1." + method.__qualname__.split(".")[0].removesuffix("Service")
    stats = GRPC_STATS.method(service, method.__name__)
    clock = time.perf_counter

    @functools.wraps(method)
    async def wrapper(self, request, context):
        t0 = clock()
        code = "UNKNOWN"  # an unexpected exception: grpc answers UNKNOWN
        try:
            result = await method(self, request, context)
            code = "OK"
            return result
        except RequestFailed as e:
            code = e.code.name
            await e.abort(context)
        except (InvalidRequest, StorageInvalidRequest) as e:
            code = "INVALID_ARGUMENT"
            await invalid_argument(str(e)).abort(context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            stats.record(code, clock() - t0)

    return wrapper


def out_of_range(e: RevisionError) -> RequestFailed:
    """A read at a compacted or future revision (etcd: "mvcc: required revision ...")."""
    return RequestFailed(grpc.StatusCode.OUT_OF_RANGE, f"mvcc: {e}", not_applied=True)


def apply_error(err: ApplyError) -> RequestFailed:
    """The state machine refused the command on every replica: certainly nothing applied."""
    return RequestFailed(grpc.StatusCode[err.code.name], err.message, not_applied=True)


class KVService(kv_pb2_grpc.KVServicer):
    def __init__(self, node: Node, limits: Limits, guard: AuthGuard | None = None) -> None:
        self.node = node
        self.limits = limits
        self.guard = guard if guard is not None else AuthGuard(node)
        self.default_timeout = node.cfg.request_timeout_ms / 1000
        self._cluster_id = node.cfg.cluster_id
        self._by_kind: dict[str, Callable[[Any, float, Any, str | None], Awaitable[None]]] = {
            "range": self._range,
            "put": self._put,
            "delete_range": lambda r, t, out, user: self._one_write(r, "delete_range", t, out, user),
            "txn": lambda r, t, out, user: self._one_write(r, "txn", t, out, user),
            "batch": self._batch,
        }

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.default_timeout
        return max(0.0, min(remaining, self.default_timeout))

    def _check_op(self, op: kv_pb2.RequestOp) -> None:
        self.limits.check_op(op)
        storage_check_op(op)  # the state machine's own rules (e.g. txn key conflicts)

    # ------------------------------------------------------------------ reads

    @handles_errors
    async def Range(self, request: kv_pb2.RangeRequest, context) -> kv_pb2.RangeResponse:
        resp = kv_pb2.RangeResponse()
        await self._range(request, self._timeout(context), resp, self.guard.user(context))
        return resp

    async def _range(self, request: kv_pb2.RangeRequest, timeout: float, resp: kv_pb2.RangeResponse,
                     user: str | None) -> None:
        self.limits.check_request_size(request)
        self._check_op(kv_pb2.RequestOp(request_range=request))
        if request.serializable:
            self.node.check_serving()
        else:
            await self.node.read_barrier(timeout)
        if user is not None:
            self._check_access(user, READ, request.key, request.range_end)
        result = (await self.node.range_many([request], [resp]))[0]  # validated just above
        if isinstance(result, RevisionError):
            raise out_of_range(result)

    def _check_access(self, user: str, access: str, key: bytes, range_end: bytes) -> int:
        """PERMISSION_DENIED unless ``user`` may; the auth revision checked at."""
        perms = self.guard.permissions(user)
        try:
            perms.check(access, key, range_end)
        except Denied as e:
            raise permission_denied(str(e)) from None
        return perms.revision

    # ------------------------------------------------------------------ writes

    async def _write(self, op: kv_pb2.RequestOp, request_id, timeout: float,
                     user: str | None) -> command_pb2.CommandResult | None:
        self._check_op(op)
        auth_revision = self.guard.check_op(user, op)
        result = await self.node.propose([op], request_id, timeout, user, auth_revision)
        if result is None:  # --testing-ack-before-commit: an answer before commit (UNSAFE)
            return None
        if isinstance(result, ApplyError):
            raise apply_error(result)
        return result

    def _finish(self, response, result) -> None:
        if result is None:
            response.header.CopyFrom(self.node.header())
        else:
            self._write_header(response.header, result.revision)

    def _write_header(self, header: kv_pb2.ResponseHeader, revision: int) -> None:
        """A write's header, set in place (the fields of Node.header(), the write's own revision)."""
        header.cluster_id = self._cluster_id
        header.member_id = self.node.id
        header.raft_term = self.node.term
        header.revision = revision

    async def _one_write(self, request, field: str, timeout: float, resp, user: str | None) -> None:
        """DeleteRange and Txn: one op in one Command; the RequestId travels once, in the Command."""
        self.limits.check_request_size(request)
        op = kv_pb2.RequestOp(**{f"request_{field}": request})
        getattr(op, f"request_{field}").ClearField("request_id")
        result = await self._write(op, _request_id(request), timeout, user)
        if result is None:  # --testing-ack-before-commit: claim success (UNSAFE)
            if field == "txn":
                resp.succeeded = True
        else:
            resp.CopyFrom(getattr(result.responses[0], f"response_{field}"))
        self._finish(resp, result)

    @handles_errors
    async def Put(self, request: kv_pb2.PutRequest, context) -> kv_pb2.PutResponse:
        resp = kv_pb2.PutResponse()
        await self._put(request, self._timeout(context), resp, self.guard.user(context))
        return resp

    async def _put(self, request: kv_pb2.PutRequest, timeout: float, resp: kv_pb2.PutResponse,
                   user: str | None) -> None:
        """The request nearly every write load is made of, checked and proposed without detours."""
        self.limits.check_put_request(request)
        op = kv_pb2.RequestOp()
        put = op.request_put
        put.CopyFrom(request)
        put.ClearField("request_id")
        storage_check_op(op)
        auth_revision = 0
        if user is not None:
            auth_revision = self._check_access(user, WRITE, request.key, b"")
        rid = request.request_id if request.HasField("request_id") else None
        result = await self.node.propose([op], rid, timeout, user, auth_revision)
        if result is None:  # --testing-ack-before-commit: an answer before commit (UNSAFE)
            resp.header.CopyFrom(self.node.header())
            return
        if isinstance(result, ApplyError):
            raise apply_error(result)
        if type(result) is not PlainPuts:
            resp.CopyFrom(result.responses[0].response_put)
        self._write_header(resp.header, result.revision)

    @handles_errors
    async def DeleteRange(self, request: kv_pb2.DeleteRangeRequest, context) -> kv_pb2.DeleteRangeResponse:
        resp = kv_pb2.DeleteRangeResponse()
        await self._one_write(request, "delete_range", self._timeout(context), resp, self.guard.user(context))
        return resp

    @handles_errors
    async def Txn(self, request: kv_pb2.TxnRequest, context) -> kv_pb2.TxnResponse:
        resp = kv_pb2.TxnResponse()
        await self._one_write(request, "txn", self._timeout(context), resp, self.guard.user(context))
        return resp

    # ------------------------------------------------------------------ batch

    @handles_errors
    async def Batch(self, request: kv_pb2.BatchRequest, context) -> kv_pb2.BatchResponse:
        resp = kv_pb2.BatchResponse()
        await self._batch(request, self._timeout(context), resp, self.guard.user(context))
        return resp

    async def _batch(self, request: kv_pb2.BatchRequest, timeout: float, resp: kv_pb2.BatchResponse,
                     user: str | None) -> None:
        """Independent ops: each valid one proceeds, each invalid one gets its own OpError.

        The mutations go out as one Command (one log entry, one RequestId);
        the reads share one ReadIndex confirmation and one LMDB read
        transaction (StateMachine.range_many). Results are written straight
        into the response's slots rather than built and copied in.
        """
        self.limits.check_request_size(request)
        self.limits.check_batch_size(request)
        ops = request.ops
        slots = [resp.results.add() for _ in range(len(ops))]  # one per op, in order
        writes: list[int] = []
        reads: list[int] = []
        max_key, max_value = self.limits.max_key_bytes, self.limits.max_value_bytes
        for i, op in enumerate(ops):
            # The ops nearly every batch is made of, a put or a single-key get, are checked
            # inline: the same rules as _check_op (max_key <= the storage's key limit), which
            # is still what names the problem of an op that breaks one.
            # An op of another kind reads as a put (or range) of the empty key, protobuf's default,
            # which no valid op has: WhichOneof cost ~1,700 instructions per op.
            p = op.request_put
            key = p.key
            if key:
                if len(key) <= max_key and len(p.value) <= max_value and not p.lease:
                    writes.append(i)
                    continue
            else:
                r = op.request_range
                key = r.key
                if key and len(key) <= max_key and not r.range_end and r.limit >= 0:
                    reads.append(i)
                    continue
            try:
                self._check_op(op)
            except (InvalidRequest, StorageInvalidRequest) as e:
                _set_op_error(slots[i], grpc.StatusCode.INVALID_ARGUMENT, str(e))
                continue
            missing = missing_lease(op, self.node.sm.leases)
            if missing:  # its own error, not the whole Command's (apply checks again: a revoke may race)
                _set_op_error(slots[i], grpc.StatusCode.NOT_FOUND, f"{LEASE_NOT_FOUND} (lease {missing})")
                continue
            (writes if is_mutation(op) else reads).append(i)

        auth_revision = 0
        if user is not None:  # each op the user may not run fails alone (reads: after the barrier)
            perms = self.guard.permissions(user)
            writes = _permitted(perms, ops, writes, slots)
            auth_revision = perms.revision

        counts = GRPC_STATS.batch_ops
        counts["write"] += len(writes)
        counts["read"] += len(reads)
        counts["invalid"] += len(ops) - len(writes) - len(reads)
        linearizable = any(not ops[i].request_range.serializable for i in reads)
        if writes or (linearizable and not self.node.cfg.testing_unsafe_local_reads):
            self.node.check_leader()
        else:
            self.node.check_serving()

        write_task = None
        if writes:
            rid = request.request_id if request.HasField("request_id") else None
            write_task = asyncio.ensure_future(self.node.propose([ops[i] for i in writes], rid, timeout, user,
                                                                auth_revision))
        if reads:
            if linearizable:
                try:
                    await self.node.read_barrier(timeout)
                except RequestFailed as e:
                    for i in reads:
                        if not ops[i].request_range.serializable:
                            _set_op_error(slots[i], e.code, e.message)
                    reads = [i for i in reads if ops[i].request_range.serializable]
            if user is not None:
                reads = _permitted(self.guard.permissions(user), ops, reads, slots)
            served = await self.node.range_many(  # validated by _check_op above
                [ops[i].request_range for i in reads],
                [slots[i].response.response_range for i in reads],
            )
            for i, result in zip(reads, served):
                if isinstance(result, RevisionError):
                    slots[i].ClearField("response")
                    _set_op_error(slots[i], grpc.StatusCode.OUT_OF_RANGE, f"mvcc: {result}")
        revision = None
        if write_task is not None:
            result = await write_task  # RequestFailed here fails the whole RPC: outcome unknown
            if isinstance(result, ApplyError):
                err = result.to_proto()
                for i in writes:
                    slots[i].error.CopyFrom(err)
            elif type(result) is PlainPuts:  # the writes were plain puts: their revisions follow on
                rev = result.first_revision
                for i in writes:
                    slots[i].response.response_put.header.revision = rev
                    rev += 1
                revision = result.revision
            elif result is not None:
                revision = result.revision
                for i, r in zip(writes, result.responses):
                    slots[i].response.CopyFrom(r)
            else:  # --testing-ack-before-commit
                for i in writes:
                    slots[i].response.CopyFrom(_empty_response(ops[i]))
        resp.header.CopyFrom(self.node.header())
        if revision is not None:
            resp.header.revision = max(resp.header.revision, revision)

    # ------------------------------------------------------------------ compaction

    @handles_errors
    async def Compact(self, request: kv_pb2.CompactionRequest, context) -> kv_pb2.CompactionResponse:
        """Propose a compaction; answered once applied (the removal goes on in the background).
        With auth enabled it needs the root role: it takes history away from every user."""
        self.guard.check_root(context, "Compact")
        if request.revision <= 0:
            raise invalid_argument("compaction revision must be >= 1")
        cmd = command_pb2.Command(compaction=kv_pb2.CompactionRequest(revision=request.revision))
        result = await self.node.propose_internal(cmd, self._timeout(context))
        if isinstance(result, ApplyError):
            raise apply_error(result)
        resp = kv_pb2.CompactionResponse()
        self._write_header(resp.header, result.revision)
        return resp

    # ------------------------------------------------------------------ session stream

    async def Session(self, request_iterator, context) -> None:
        """Every call above, many in flight on one stream (see session_stream.py)."""
        token, cert_name = self.guard.credentials(context)  # the stream's; each request is checked with them
        user_of = self.guard.user_of
        by_kind = self._by_kind

        def handle(kind: str, request: Any, timeout: float, resp: Any) -> Awaitable[None]:
            """One session request, by its SessionRequest field: the unary call's code, answering into ``resp``."""
            return by_kind[kind](request, timeout, resp, user_of(token, cert_name))

        stream = SessionStream(
            handle, max_in_flight=self.node.cfg.max_stream_in_flight, default_timeout=self.default_timeout,
        )
        # Headers at once: the client writes nothing until it has them, so a stream that
        # never connected leaves its requests certainly unapplied.
        await context.send_initial_metadata(())
        await stream.run(request_iterator, context.write)


def _permitted(perms: UserPermissions, ops, indexes: list[int], slots) -> list[int]:
    """The ops among ``indexes`` that ``perms`` allow; the others get PERMISSION_DENIED in their slot."""
    if perms.root:
        return indexes
    allowed = []
    for i in indexes:
        try:
            perms.check_op(ops[i])
        except Denied as e:
            _set_op_error(slots[i], grpc.StatusCode.PERMISSION_DENIED, str(e))
            continue
        allowed.append(i)
    return allowed


def _set_op_error(slot: kv_pb2.BatchResult, code: grpc.StatusCode, message: str) -> None:
    slot.error.code = code.value[0]
    slot.error.message = message


def _request_id(request) -> kv_pb2.RequestId | None:
    return request.request_id if request.HasField("request_id") else None


def _empty_response(op: kv_pb2.RequestOp) -> kv_pb2.ResponseOp:
    kind = op.WhichOneof("request")
    if kind == "request_put":
        return kv_pb2.ResponseOp(response_put=kv_pb2.PutResponse())
    if kind == "request_delete_range":
        return kv_pb2.ResponseOp(response_delete_range=kv_pb2.DeleteRangeResponse())
    return kv_pb2.ResponseOp(response_txn=kv_pb2.TxnResponse(succeeded=True))
