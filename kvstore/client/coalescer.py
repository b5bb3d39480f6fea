"""Request coalescing: concurrent calls go out together as one Batch RPC.

A gRPC round trip costs the server far more than the op it carries (issue 7:
~7-8k unary RPCs/s per process against ~180k puts/s when batched), so the
AsyncClient gathers every op submitted during one event-loop turn and sends
them as a single Batch at the start of the next turn. The added latency is at
most that one turn. A batch is also closed as soon as it reaches ``max_ops`` or
``max_bytes`` (it still leaves on that next turn; later ops form another).
Each op is written straight into the pending BatchRequest (no copy), and each
caller gets its own result or its own error back.

Serializable reads go in a separate batch from leader-bound ops because any
member may serve them. A batch of one op is sent as its plain unary RPC.
"""
from __future__ import annotations

import asyncio
from typing import Any
from collections.abc import Awaitable, Callable

from kvstore.client import errors
from kvstore.v1 import kv_pb2

__all__ = ["Coalescer", "LEADER", "ANY", "response"]

LEADER = "leader"
ANY = "any"

#: Unary RPC name for each RequestOp kind (used when a batch holds one op).
_UNARY = {
    "request_put": "Put",
    "request_range": "Range",
    "request_delete_range": "DeleteRange",
    "request_txn": "Txn",
}
_BatchResult = kv_pb2.BatchResult


def response(answer: Any, field: str) -> Any:
    """The response message of a coalesced op's answer (``field``: "response_put", ...)."""
    return getattr(answer.response, field) if type(answer) is _BatchResult else answer

Send = Callable[..., Awaitable[Any]]


class _Pending:
    __slots__ = ("req", "add_op", "futures", "new_future", "nbytes", "mutation", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.req = kv_pb2.BatchRequest()
        self.add_op = self.req.ops.add
        self.futures: list[asyncio.Future[Any]] = []
        self.new_future = loop.create_future
        self.nbytes = 0
        self.mutation = False
        self.timeout: float | None = None


class Coalescer:
    """Collects ops per route and flushes them as Batch RPCs through ``send``.

    ``send(method, request, route=..., mutation=..., timeout=...)`` is the
    client's retrying call; it assigns the RequestId when ``mutation`` is set.
    """

    def __init__(
        self,
        send: Send,
        *,
        max_ops: int = 256,
        max_bytes: int = 1 << 20,
        timeout: float = 5.0,
        retryable: Callable[[int], bool] = lambda code: False,
        session_expired: Callable[[int], None] = lambda client_id: None,
        session_unopened: Callable[[int], None] = lambda client_id: None,
    ) -> None:
        if max_ops < 1 or max_bytes < 1:
            raise ValueError("max_ops and max_bytes must be >= 1")
        self._send = send
        self._timeout = timeout
        self._retryable = retryable
        self._session_expired = session_expired  # told the client_id whose session the cluster refused
        # told the client_id whose seq 1 (the request that opens its session) no mutation of came through
        self._session_unopened = session_unopened
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Number of RPCs sent and ops carried (for tests and benchmarks).
        self.rpcs = 0
        self.ops = 0

    def add(
        self, route: str, kind: str, mutation: bool, nbytes: int, timeout: float | None
    ) -> tuple[Any, asyncio.Future[Any]]:
        """Reserve a slot for one op: returns its (empty) ``kind`` message to fill now, and its future.

        ``kind`` is the RequestOp field ("request_put", ...). The future
        resolves to the op's answer, either its response message (e.g.
        PutResponse) or its BatchResult slot holding one (``response`` gives
        the message either way), or fails with its typed error. Filling the
        message must happen before the caller yields: the batch leaves on the
        next loop turn.
        """
        p = self._pending.get(route)
        if p is None or p.nbytes + nbytes > self.max_bytes:
            # None pending, or adding this op would overshoot the byte cap (and
            # maybe the server's request limit): start afresh. The sender
            # task's first step runs on the next loop turn, after every caller
            # made ready in this turn has added its op.
            p = self._pending[route] = _Pending(asyncio.get_running_loop())
            self._spawn(self._run(route, p))
        fut = p.new_future()
        futures = p.futures
        futures.append(fut)
        p.nbytes += nbytes
        if mutation:
            p.mutation = True
        if timeout is not None and (p.timeout is None or timeout > p.timeout):
            p.timeout = timeout
        if len(futures) >= self.max_ops or p.nbytes >= self.max_bytes:
            del self._pending[route]  # full: later ops start a new batch
        return getattr(p.add_op(), kind), fut

    async def _run(self, route: str, p: _Pending) -> None:
        if self._pending.get(route) is p:
            del self._pending[route]  # closed: ops added from now on form the next batch
        futures = p.futures
        started = asyncio.get_running_loop().time()
        self.rpcs += 1
        self.ops += len(futures)
        try:
            if len(futures) == 1:
                op = p.req.ops[0]
                which = op.WhichOneof("request")
                resp = await self._send(
                    _UNARY[which], getattr(op, which), route=route, mutation=p.mutation, timeout=p.timeout
                )
                if not futures[0].done():
                    futures[0].set_result(resp)
                return
            resp = await self._send("Batch", p.req, route=route, mutation=p.mutation, timeout=p.timeout)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        except Exception as e:  # the whole RPC failed: every caller gets the error
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            return
        results = resp.results
        if len(results) != len(futures):
            err = errors.InternalError(f"batch of {len(futures)} ops answered with {len(results)} results")
            for f in futures:
                if not f.done():
                    f.set_exception(err)
            return
        rid = p.req.request_id
        if rid.seq == 1 and not any(r.WhichOneof("result") == "response" and _is_mutation(op)
                                    for r, op in zip(results, p.req.ops)):
            self._session_unopened(rid.client_id)
        for i, (f, r) in enumerate(zip(futures, results)):
            if f.done():
                continue  # the caller gave up (cancelled or timed out)
            if r.WhichOneof("result") == "response":
                # The slot itself: each caller reads its own response out of
                # it, and results nobody reads never get their wrappers made.
                f.set_result(r)
                continue
            code = r.error.code
            op = p.req.ops[i]
            if self._retryable(code) and op.WhichOneof("request") == "request_range":
                # A read refused for a passing reason (e.g. leadership not
                # confirmed in time) is safe to send again, on its own.
                left = (p.timeout or self._timeout) - (asyncio.get_running_loop().time() - started)
                self._spawn(self._retry_read(route, op.request_range, f, left))
            else:
                refused = errors.from_status(errors.status_code(code), r.error.message)
                if isinstance(refused, errors.SessionExpired):
                    self._session_expired(p.req.request_id.client_id)
                f.set_exception(refused)

    async def _retry_read(
        self, route: str, req: kv_pb2.RangeRequest, fut: asyncio.Future[Any], timeout: float
    ) -> None:
        try:
            resp = await self._send("Range", req, route=route, mutation=False, timeout=max(timeout, 0.001))
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            if not fut.done():
                fut.set_exception(e)
        else:
            if not fut.done():
                fut.set_result(resp)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait until every pending batch has been sent and answered."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _is_mutation(op: kv_pb2.RequestOp) -> bool:
    return op.WhichOneof("request") != "request_range"
