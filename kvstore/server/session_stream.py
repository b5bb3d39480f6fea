"""The server end of a client session stream: many requests in flight on one bidirectional RPC.

A stream answers several times more requests per second than unary calls
(no per-call HTTP/2 stream, headers or trailers), so the client library sends
everything over a few per member. Each stream has three parts:

- the reader (the RPC handler itself) takes one message at a time and starts a
  task for each request in it (a client packs the requests waiting together
  into one message, in ``more``); each request takes an in-flight slot first,
  so at ``max_in_flight`` unanswered requests it stops reading and HTTP/2 flow
  control pushes back on the client;
- one task per request runs it through the same code as the unary call (and so
  the same proposal batching) and queues its answer;
- one writer task drains that queue, because grpc.aio allows one write in
  flight per stream; every answer waiting when it is free goes out in one
  message (a message costs far more than an answer). A slot is released only
  once its answer is written, so the queue never holds more than
  ``max_in_flight`` answers.

A client that stops reading (a slow consumer) therefore stalls its own writer,
then its own reader, and nothing else: other streams have their own tasks.

A request that fails, including a malformed one (no id, no request), is
answered with a ``RequestError`` carrying what the unary call's status and
trailing metadata would have said; the stream and the member go on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from kvstore.storage.errors import InvalidRequest as StorageInvalidRequest
from kvstore.v1 import kv_pb2

from .errors import LEADER_ADDR_KEY, LEADER_ID_KEY, RequestFailed
from .grpc_metrics import GRPC_STATS, MethodStats
from .limits import InvalidRequest

__all__ = ["SessionStream", "Handler", "request_error"]

log = logging.getLogger("kvstore.kv")

#: Runs one request: (kind, request message, timeout in seconds, response message to fill).
#: ``kind`` is the SessionRequest oneof field ("put", "range", ...); the response
#: is the SessionResponse's field of the same name. Raises RequestFailed or InvalidRequest.
Handler = Callable[[str, Any, float, Any], Awaitable[None]]

_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]

#: Answers waiting together go out in one message up to about this size (a big
#: range answer still goes alone; the client accepts 64 MiB messages).
MAX_BATCH_BYTES = 1 << 20


# The metrics of the unary method each kind of session request stands for (made up front, so that
# every series starts at 0 and a rate sees its first requests).
_STATS: dict[str | None, MethodStats] = {
    kind: GRPC_STATS.method("kvstore.v1.KV", method, "session")
    for kind, method in (("range", "Range"), ("put", "Put"), ("delete_range", "DeleteRange"), ("txn", "Txn"),
                         ("batch", "Batch"), (None, "Invalid"))}


def request_error(out: kv_pb2.RequestError, err: BaseException) -> None:
    """Fill ``out`` with what ``err`` would have been as a unary call's status and trailing metadata."""
    if isinstance(err, RequestFailed):
        out.code = err.code.value[0]
        out.message = err.message
        out.not_applied = err.not_applied
        for k, v in err.metadata:
            if k == LEADER_ID_KEY:
                out.leader_id = int(v)
            elif k == LEADER_ADDR_KEY:
                out.leader_addr = v
    elif isinstance(err, (InvalidRequest, StorageInvalidRequest)):
        out.code = _INVALID
        out.message = str(err)
        out.not_applied = True
    else:  # a bug, not the client's fault: say so; the outcome of a write is unknown
        out.code = grpc.StatusCode.INTERNAL.value[0]
        out.message = f"internal error: {type(err).__name__}: {err}"


class SessionStream:
    """Serves one session stream; ``run`` returns when the client half-closes and every answer is written."""

    def __init__(self, handler: Handler, *, max_in_flight: int, default_timeout: float) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._handler = handler
        self._max_in_flight = max_in_flight
        self._default_timeout = default_timeout
        #: Requests read from this stream so far (tests and metrics look at it).
        self.received = 0

    async def run(
        self,
        requests: AsyncIterator[kv_pb2.SessionRequest],
        write: Callable[[kv_pb2.SessionResponse], Awaitable[None]],
    ) -> None:
        """Serve ``requests`` until the client half-closes; ``write`` sends one message back."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._max_in_flight)
        answers: asyncio.Queue[kv_pb2.SessionAnswer | None] = asyncio.Queue()
        writer = loop.create_task(self._write_loop(answers, write, slots))
        me = asyncio.current_task()

        def writer_done(t: asyncio.Task[None]) -> None:
            if me is not None and not t.cancelled() and t.exception() is not None:
                me.cancel()  # the stream is broken: stop reading too

        writer.add_done_callback(writer_done)
        tasks: set[asyncio.Task[None]] = set()
        reader = requests.__aiter__()
        try:
            while True:
                await slots.acquire()  # at the bound: stop reading until an answer is written
                try:
                    req = await reader.__anext__()
                except StopAsyncIteration:
                    slots.release()
                    break
                self._start(req, False, answers, tasks)
                for packed in req.more:  # requests packed into the same message: a slot each
                    await slots.acquire()
                    self._start(packed, True, answers, tasks)
            # The client half-closed: finish what it sent, then end the RPC.
            while tasks:
                await asyncio.gather(*tasks)
            answers.put_nowait(None)
            await writer
        finally:
            for t in tasks:
                t.cancel()
            writer.cancel()

    def _start(self, req: kv_pb2.SessionRequest, packed: bool, answers: asyncio.Queue[Any],
               tasks: set[asyncio.Task[None]]) -> None:
        self.received += 1
        task = asyncio.get_running_loop().create_task(self._answer(req, packed, answers))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _answer(self, req: kv_pb2.SessionRequest, packed: bool, answers: asyncio.Queue[Any]) -> None:
        resp = kv_pb2.SessionAnswer(id=req.id)
        t0 = time.perf_counter()
        code = "OK"
        kind = None
        try:
            kind = req.WhichOneof("request")
            if not req.id:
                raise InvalidRequest("session request id must be non-zero")
            if kind is None:
                raise InvalidRequest("session request is empty: set one of range, put, delete_range, txn or batch")
            if packed and req.more:
                raise InvalidRequest("a session request in `more` may not carry `more` of its own")
            timeout = self._default_timeout
            if req.timeout_ms:
                timeout = min(timeout, req.timeout_ms / 1000)
            out = getattr(resp, kind)
            out.SetInParent()  # the answer is of this kind even if the handler leaves it empty
            await self._handler(kind, getattr(req, kind), timeout, out)
        except asyncio.CancelledError:
            raise
        except (RequestFailed, InvalidRequest, StorageInvalidRequest) as e:
            resp.ClearField("response")
            request_error(resp.error, e)
            code = e.code.name if isinstance(e, RequestFailed) else "INVALID_ARGUMENT"
        except Exception as e:
            log.exception("session request %d failed", req.id)
            resp.ClearField("response")
            request_error(resp.error, e)
            code = "INTERNAL"
        # Counted like the unary call it stands for (grpc_metrics.py), as grpc_type "session".
        _STATS[kind].record(code, time.perf_counter() - t0)
        answers.put_nowait(resp)

    @staticmethod
    async def _write_loop(
        answers: asyncio.Queue[kv_pb2.SessionAnswer | None],
        write: Callable[[kv_pb2.SessionResponse], Awaitable[None]],
        slots: asyncio.Semaphore,
    ) -> None:
        done = False
        while not done:
            answer = await answers.get()
            if answer is None:
                return
            msg = kv_pb2.SessionResponse()
            batch = msg.answers
            batch.append(answer)
            size = answer.ByteSize()
            while size < MAX_BATCH_BYTES and not answers.empty():
                answer = answers.get_nowait()
                if answer is None:
                    done = True
                    break
                batch.append(answer)
                size += answer.ByteSize()
            await write(msg)
            for _ in range(len(batch)):
                slots.release()
