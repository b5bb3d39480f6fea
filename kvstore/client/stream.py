"""The client end of a session stream: a long-lived bidirectional RPC to one member.

A stream answers several times more requests per second than unary calls and
halves the round trip, so every KV call (and every coalesced Batch, as one
message) goes over one by default (the client keeps a few per member and uses
them in turn, see endpoints.Connection). The stream only carries requests: which
member to use, redirects, retries and exactly-once stay in the client's one
call path (``AsyncClient._call``), which reads a stream's failure exactly as it
reads a unary call's status and trailing metadata (``AttemptFailed``).

One stream = one reader task matching answers to callers by request id (they
come back out of order), and one writer task draining a queue (grpc.aio allows
one write in flight per stream); the requests waiting in the queue when it is
free go out packed in one message, each still a request of its own (its own
id, answer and error), as the member packs its answers. A caller takes an
in-flight slot before it queues its request, so a stream never has more than
``max_in_flight`` requests queued or unanswered: further callers wait
(backpressure, no unbounded queue).

A stream that breaks fails every request still pending on it. A request
already written may have been applied, so it fails "outcome unknown" (no
not-applied mark); one never written (still queued, or the stream never
connected) fails "not applied". The client's retry re-sends a mutation with
the same RequestId on a fresh stream, so it is applied at most once.
"""
from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kvstore.v1 import kv_pb2

__all__ = ["SessionStream", "AttemptFailed", "KIND", "DEFAULT_MAX_IN_FLIGHT"]

#: Matches the member's default --max-stream-in-flight.
DEFAULT_MAX_IN_FLIGHT = 1024

#: The SessionRequest field carrying each unary call's request.
KIND: dict[str, str] = {
    "Range": "range",
    "Put": "put",
    "DeleteRange": "delete_range",
    "Txn": "txn",
    "Batch": "batch",
}
#: The field number of each kind in SessionRequest (the request is framed by hand, see _frame).
_FIELD = {name: kv_pb2.SessionRequest.DESCRIPTOR.fields_by_name[name].number for name in KIND.values()}
_TAG = {name: bytes([(num << 3) | 2]) for name, num in _FIELD.items()}  # length-delimited
#: Requests waiting together are packed into one message up to about this size (one bigger
#: request still goes alone); well under the member's receive cap of 4 x --max-request-bytes.
PACK_BYTES = 256 << 10

MD_LEADER_ID = "kvstore-leader-id"
MD_LEADER_ADDR = "kvstore-leader-addr"
MD_NOT_APPLIED = "kvstore-not-applied"
_NOT_APPLIED = {MD_NOT_APPLIED: "1"}
_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


class AttemptFailed(Exception):
    """One attempt failed: its status code, details and trailing metadata, as a unary call reports them."""

    def __init__(
        self, code: grpc.StatusCode, details: str, metadata: dict[str, str] | None = None, *,
        unreachable: bool = False,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.metadata: dict[str, str] = metadata if metadata is not None else {}
        #: The member did not answer (connection refused or broken, or silent): the circuit breaker counts it.
        self.unreachable = unreachable


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: The tag of SessionRequest.more (length-delimited): a further request packed into the same message.
_MORE_TAG = _varint((kv_pb2.SessionRequest.DESCRIPTOR.fields_by_name["more"].number << 3) | 2)


def _frame(rid: int, timeout_ms: int, kind: str, request: Any) -> bytes:
    """SessionRequest(id=rid, timeout_ms=..., <kind>=request) serialized, without copying ``request`` into it."""
    body = request.SerializeToString()
    return b"".join((b"\x08", _varint(rid), b"\x10", _varint(timeout_ms), _TAG[kind], _varint(len(body)), body))


def _identity(b: bytes) -> bytes:
    return b


def _error(e: kv_pb2.RequestError) -> AttemptFailed:
    """A member's RequestError as the status and trailing metadata of a unary call."""
    md: dict[str, str] = {}
    if e.not_applied:
        md[MD_NOT_APPLIED] = "1"
    if e.leader_addr:
        md[MD_LEADER_ADDR] = e.leader_addr
        md[MD_LEADER_ID] = str(e.leader_id)
    return AttemptFailed(_CODES.get(e.code, grpc.StatusCode.UNKNOWN), e.message, md)


class SessionStream:
    """One open session stream to one member. ``broken`` once it failed; the owner then opens a new one."""

    def __init__(self, channel: grpc.aio.Channel, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 metadata: tuple[tuple[str, str], ...] | None = None, generation: int = 0) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        method = channel.stream_stream(
            "/kvstore.v1.KV/Session",
            request_serializer=_identity,
            response_deserializer=kv_pb2.SessionResponse.FromString,
        )
        self._call = method(metadata=metadata)  # the auth token, sent once for the whole stream
        #: The credentials' generation whose token the stream carries (see credentials.py).
        self.generation = generation
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._written = 0  # the highest request id written to the stream (ids are written in order)
        self.broken = False
        self.connected = False
        self._writer = loop.create_task(self._write_loop())
        self._reader = loop.create_task(self._read_loop())

    @property
    def in_flight(self) -> int:
        """Requests queued or unanswered on this stream."""
        return len(self._pending)

    async def call(self, kind: str, request: Any, timeout: float) -> Any:
        """Send ``request`` as the SessionRequest field ``kind``; return the response message of that field.

        Raises AttemptFailed: the member's error for this request, a deadline
        (no answer within ``timeout``), or the stream breaking.
        """
        slots = self._slots
        if slots.locked():  # backpressure: the stream is at its bound
            try:
                await asyncio.wait_for(slots.acquire(), timeout)
            except TimeoutError:
                raise AttemptFailed(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "session stream stayed at its in-flight bound",
                    dict(_NOT_APPLIED),
                ) from None
        else:
            await slots.acquire()
        try:
            if self.broken:
                raise AttemptFailed(grpc.StatusCode.UNAVAILABLE, "session stream closed", dict(_NOT_APPLIED))
            rid = self._next_id
            self._next_id = rid + 1
            fut = self._loop.create_future()
            self._pending[rid] = fut
            timer = self._loop.call_later(timeout, self._expire, rid)
            self._queue.put_nowait((rid, _frame(rid, max(1, int(timeout * 1000)), kind, request)))
            try:
                resp = await fut
            finally:
                timer.cancel()
                self._pending.pop(rid, None)
        finally:
            slots.release()
        which = resp.WhichOneof("response")
        if which == "error":
            raise _error(resp.error)
        if which != kind:
            raise AttemptFailed(grpc.StatusCode.INTERNAL, f"{kind} request answered with {which}")
        return getattr(resp, which)

    def _expire(self, rid: int) -> None:
        fut = self._pending.get(rid)
        if fut is None or fut.done():
            return
        if rid > self._written:  # still queued: dropped from the queue's view, so never sent
            del self._pending[rid]
            why = "the session stream was busy" if self.connected else "the member never answered the stream"
            fut.set_exception(AttemptFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"not sent: {why}", dict(_NOT_APPLIED),
                unreachable=not self.connected,
            ))
        else:
            fut.set_exception(AttemptFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no answer on the session stream", unreachable=True
            ))

    async def _write_loop(self) -> None:
        call = self._call
        queue = self._queue
        try:
            # The member answers the stream's headers at once: until then nothing is written,
            # so a member that refuses the connection leaves every request certainly unapplied.
            await call.wait_for_connection()
            self.connected = True
            pending = self._pending
            while True:
                rid, frame = await queue.get()
                if rid not in pending:  # already given up on
                    continue
                # Pack the requests waiting behind it into the same message (SessionRequest.more):
                # a message costs both ends far more than a request does. Callers woken in the
                # same loop turn as this writer queue theirs after it runs: let them, first
                # (unless this request is alone on the stream: then nobody else is coming).
                if queue.empty() and len(pending) > 1:
                    await asyncio.sleep(0)
                parts = [frame]
                size = len(frame)
                while size < PACK_BYTES and not queue.empty():
                    more_rid, more = queue.get_nowait()
                    if more_rid in pending:
                        rid = more_rid
                        parts += (_MORE_TAG, _varint(len(more)), more)
                        size += len(more)
                self._written = rid  # from here on they may reach the member (ids are queued in order)
                await call.write(parts[0] if len(parts) == 1 else b"".join(parts))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            self._break(e.code(), e.details() or "")
        except Exception as e:  # e.g. grpc.aio.UsageError after the call ended
            self._break(grpc.StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}")

    async def _read_loop(self) -> None:
        call = self._call
        pending = self._pending
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    self._break(grpc.StatusCode.UNAVAILABLE, "the member ended the session stream")
                    return
                assert isinstance(resp, kv_pb2.SessionResponse)
                for answer in resp.answers:
                    fut = pending.get(answer.id)
                    if fut is not None and not fut.done():
                        fut.set_result(answer)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            self._break(e.code(), e.details() or "")
        except Exception as e:
            self._break(grpc.StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}")

    def _break(self, code: grpc.StatusCode, details: str) -> None:
        """Fail every pending request: written ones "outcome unknown", the rest "not applied"."""
        if self.broken:
            return
        self.broken = True
        # However gRPC names it (UNAVAILABLE, INTERNAL for an RST_STREAM, UNKNOWN, ...), a stream
        # that broke is a transport failure: retryable, and the member counts as unreachable.
        details = f"{code.name}: {details}"
        code = grpc.StatusCode.UNAVAILABLE
        written = self._written if self.connected else 0
        for rid, fut in list(self._pending.items()):
            if fut.done():
                continue
            if rid <= written:
                fut.set_exception(AttemptFailed(
                    code, f"session stream broken ({details}); outcome unknown", unreachable=True
                ))
            else:
                fut.set_exception(AttemptFailed(
                    code, f"session stream broken before the request was sent ({details})", dict(_NOT_APPLIED),
                    unreachable=True,
                ))
        for t in (self._writer, self._reader):
            if t is not asyncio.current_task():
                t.cancel()
        self._call.cancel()

    def close(self) -> None:
        self._break(grpc.StatusCode.CANCELLED, "client closing")
