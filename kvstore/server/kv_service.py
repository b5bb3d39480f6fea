"""The client KV API: validate, then propose (writes) or confirm-and-read (reads).

Each handler checks the request against the limits before anything else, so
a bad request is refused (INVALID_ARGUMENT, `kvstore-not-applied: 1`) without
reaching raft. Writes go through `Node.propose` and are answered with the
state machine's result once applied; linearizable reads wait for a ReadIndex
confirmation; serializable reads are served by any member at once.
"""
from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from kvstore.storage.errors import ApplyError
from kvstore.storage.errors import InvalidRequest as StorageInvalidRequest
from kvstore.storage.plain_puts import PlainPuts
from kvstore.storage.validation import check_op as storage_check_op
from kvstore.v1 import command_pb2, kv_pb2, kv_pb2_grpc

from .errors import RequestFailed, invalid_argument
from .limits import InvalidRequest, Limits, is_mutation
from .node import Node

log = logging.getLogger("kvstore.kv")


def handles_errors(method):
    """Turn RequestFailed / InvalidRequest into a gRPC status with its trailing metadata."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except RequestFailed as e:
            await e.abort(context)
        except (InvalidRequest, StorageInvalidRequest) as e:
            await invalid_argument(str(e)).abort(context)

    return wrapper


def apply_error(err: ApplyError) -> RequestFailed:
    """The state machine refused the command on every replica: certainly nothing applied."""
    return RequestFailed(grpc.StatusCode[err.code.name], err.message, not_applied=True)


class KVService(kv_pb2_grpc.KVServicer):
    def __init__(self, node: Node, limits: Limits) -> None:
        self.node = node
        self.limits = limits
        self.default_timeout = node.cfg.request_timeout_ms / 1000
        self._cluster_id = node.cfg.cluster_id

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
        self.limits.check_request_size(request)
        self._check_op(kv_pb2.RequestOp(request_range=request))
        if request.serializable:
            self.node.check_serving()
        else:
            await self.node.read_barrier(self._timeout(context))
        return await self.node.range(request)

    # ------------------------------------------------------------------ writes

    async def _write(self, op: kv_pb2.RequestOp, request_id, context) -> command_pb2.CommandResult | None:
        self._check_op(op)
        result = await self.node.propose([op], request_id, self._timeout(context))
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

    async def _unary_write(self, request, field: str, empty, context):
        """Put, DeleteRange and Txn: one op in one Command; the RequestId travels once, in the Command."""
        self.limits.check_request_size(request)
        op = kv_pb2.RequestOp(**{f"request_{field}": request})
        getattr(op, f"request_{field}").ClearField("request_id")
        result = await self._write(op, _request_id(request), context)
        resp = empty() if result is None else getattr(result.responses[0], f"response_{field}")
        self._finish(resp, result)
        return resp

    @handles_errors
    async def Put(self, request: kv_pb2.PutRequest, context) -> kv_pb2.PutResponse:
        """_unary_write, inlined for the request nearly every write load is made of."""
        self.limits.check_put_request(request)
        op = kv_pb2.RequestOp()
        put = op.request_put
        put.CopyFrom(request)
        put.ClearField("request_id")
        storage_check_op(op)
        rid = request.request_id if request.HasField("request_id") else None
        result = await self.node.propose([op], rid, self._timeout(context))
        if result is None:  # --testing-ack-before-commit: an answer before commit (UNSAFE)
            resp = kv_pb2.PutResponse()
            resp.header.CopyFrom(self.node.header())
            return resp
        if isinstance(result, ApplyError):
            raise apply_error(result)
        resp = kv_pb2.PutResponse() if type(result) is PlainPuts else result.responses[0].response_put
        self._write_header(resp.header, result.revision)
        return resp

    @handles_errors
    async def DeleteRange(self, request: kv_pb2.DeleteRangeRequest, context) -> kv_pb2.DeleteRangeResponse:
        return await self._unary_write(request, "delete_range", kv_pb2.DeleteRangeResponse, context)

    @handles_errors
    async def Txn(self, request: kv_pb2.TxnRequest, context) -> kv_pb2.TxnResponse:
        # result is None only in --testing-ack-before-commit mode: claim success.
        return await self._unary_write(request, "txn", lambda: kv_pb2.TxnResponse(succeeded=True), context)

    # ------------------------------------------------------------------ batch

    @handles_errors
    async def Batch(self, request: kv_pb2.BatchRequest, context) -> kv_pb2.BatchResponse:
        """Independent ops: each valid one proceeds, each invalid one gets its own OpError.

        The mutations go out as one Command (one log entry, one RequestId);
        the reads share one ReadIndex confirmation and one LMDB read
        transaction (StateMachine.range_many). Results are written straight
        into the response's slots rather than built and copied in.
        """
        self.limits.check_request_size(request)
        self.limits.check_batch_size(request)
        ops = request.ops
        resp = kv_pb2.BatchResponse()
        slots = [resp.results.add() for _ in range(len(ops))]  # one per op, in order
        writes: list[int] = []
        reads: list[int] = []
        max_key, max_value = self.limits.max_key_bytes, self.limits.max_value_bytes
        for i, op in enumerate(ops):
            # The ops nearly every batch is made of, a put or a single-key get, are checked
            # inline: the same rules as _check_op (max_key <= the storage's key limit), which
            # is still what names the problem of an op that breaks one.
            kind = op.WhichOneof("request")
            if kind == "request_put":
                p = op.request_put
                key = p.key
                if key and len(key) <= max_key and len(p.value) <= max_value and not p.lease:
                    writes.append(i)
                    continue
            elif kind == "request_range":
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
            (writes if is_mutation(op) else reads).append(i)

        linearizable = any(not ops[i].request_range.serializable for i in reads)
        if writes or (linearizable and not self.node.cfg.testing_unsafe_local_reads):
            self.node.check_leader()
        else:
            self.node.check_serving()

        timeout = self._timeout(context)
        write_task = None
        if writes:
            rid = request.request_id if request.HasField("request_id") else None
            write_task = asyncio.ensure_future(self.node.propose([ops[i] for i in writes], rid, timeout))
        if reads:
            if linearizable:
                try:
                    await self.node.read_barrier(timeout)
                except RequestFailed as e:
                    for i in reads:
                        if not ops[i].request_range.serializable:
                            _set_op_error(slots[i], e.code, e.message)
                    reads = [i for i in reads if ops[i].request_range.serializable]
            await self.node.range_many(  # validated by _check_op above
                [ops[i].request_range for i in reads],
                [slots[i].response.response_range for i in reads],
            )
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
        return resp


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
