"""Both ends of the session stream against a real in-process grpc.aio server with injected faults.

The server side is the member's own ``SessionStream`` under a handler the test
controls (hold requests, answer big, fail); the client side is the library's
``SessionStream``, or a raw gRPC stream where the test must misbehave (never
read, send malformed messages).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any
from collections.abc import Awaitable, Callable

import grpc
import pytest

from kvstore.client.stream import AttemptFailed, SessionStream as ClientStream
from kvstore.server.errors import RequestFailed
from kvstore.server.limits import InvalidRequest
from kvstore.server.session_stream import SessionStream
from kvstore.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[str, Any, float, Any], Awaitable[None]]


class _KV(kv_pb2_grpc.KVServicer):
    def __init__(self, handler: Handler, max_in_flight: int) -> None:
        self.handler = handler
        self.max_in_flight = max_in_flight
        self.streams: list[SessionStream] = []
        self.messages = 0  # stream messages read (a message may pack several requests)

    async def Session(self, requests, context):  # type: ignore[no-untyped-def]
        stream = SessionStream(self.handler, max_in_flight=self.max_in_flight, default_timeout=10.0)
        self.streams.append(stream)
        await context.send_initial_metadata(())
        await stream.run(self._counted(requests), context.write)

    async def _counted(self, requests):  # type: ignore[no-untyped-def]
        async for msg in requests:
            self.messages += 1
            yield msg


async def start_server(handler: Handler, max_in_flight: int = 8) -> tuple[grpc.aio.Server, str, _KV]:
    server = grpc.aio.server()
    kv = _KV(handler, max_in_flight)
    kv_pb2_grpc.add_KVServicer_to_server(kv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", kv


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def echo(kind: str, req: Any, timeout: float, out: Any) -> None:
    """Answer a put with its value length as the revision, a range with its key as the value."""
    if kind == "put":
        out.header.revision = len(req.value)
    elif kind == "range":
        out.kvs.add(key=req.key, value=req.key)


async def read_answers(call: Any, n: int) -> list[kv_pb2.SessionAnswer]:
    """Read messages until ``n`` answers came (answers that complete together share a message)."""
    out: list[kv_pb2.SessionAnswer] = []
    while len(out) < n:
        msg = await call.read()
        assert msg is not grpc.aio.EOF, f"the stream ended after {len(out)} of {n} answers"
        out.extend(msg.answers)
    assert len(out) == n
    return out


class Held:
    """A handler that counts the requests it starts and holds each until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def __call__(self, kind: str, req: Any, timeout: float, out: Any) -> None:
        self.started += 1
        await self.release.wait()


def test_answers_completing_together_share_one_message():
    async def main() -> None:
        held = Held()
        server, addr, kv = await start_server(held, max_in_flight=64)
        async with grpc.aio.insecure_channel(addr) as ch:
            call = kv_pb2_grpc.KVStub(ch).Session()
            for i in range(1, 51):
                await call.write(put_frame(i))
            await wait_until(lambda: kv.streams and kv.streams[0].received == 50, what="50 requests read")
            held.release.set()  # all 50 complete in the same loop turn
            msg = await call.read()
            assert len(msg.answers) == 50
            call.cancel()
        await server.stop(None)

    asyncio.run(main())


def put_frame(rid: int, key: bytes = b"k", value: bytes = b"v") -> kv_pb2.SessionRequest:
    return kv_pb2.SessionRequest(id=rid, put=kv_pb2.PutRequest(key=key, value=value))


def test_answers_come_back_out_of_order_each_to_its_caller():
    async def main() -> None:
        async def slow_first(kind: str, req: Any, timeout: float, out: Any) -> None:
            await asyncio.sleep(0.3 if req.value == b"slow" else 0.0)
            out.header.revision = len(req.value)

        server, addr, _ = await start_server(slow_first)
        async with grpc.aio.insecure_channel(addr) as ch:
            s = ClientStream(ch)
            order: list[bytes] = []

            async def put(v: bytes) -> None:
                r = await s.call("put", kv_pb2.PutRequest(key=b"k", value=v), 5.0)
                assert r.header.revision == len(v)
                order.append(v)

            await asyncio.gather(put(b"slow"), put(b"quick"), put(b"quicker!"))
            assert order[-1] == b"slow"  # answered last, yet to the right caller
        await server.stop(None)

    asyncio.run(main())


def test_the_member_stops_reading_at_the_in_flight_bound():
    async def main() -> None:
        held = Held()
        server, addr, kv = await start_server(held, max_in_flight=8)
        async with grpc.aio.insecure_channel(addr) as ch:
            call = kv_pb2_grpc.KVStub(ch).Session()
            for i in range(1, 41):  # five times the bound, all written by the client
                await call.write(put_frame(i))
            await wait_until(lambda: held.started == 8, what="8 requests started")
            await asyncio.sleep(0.3)  # would the member read more? it must not
            assert kv.streams[0].received == 8 and held.started == 8
            held.release.set()
            answers = await read_answers(call, 40)
            assert all(a.WhichOneof("response") == "put" for a in answers)
            assert {a.id for a in answers} == set(range(1, 41))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        await server.stop(None)

    asyncio.run(main())


def test_the_client_keeps_at_most_its_bound_in_flight_and_makes_callers_wait():
    async def main() -> None:
        held = Held()
        server, addr, kv = await start_server(held, max_in_flight=1000)
        async with grpc.aio.insecure_channel(addr) as ch:
            s = ClientStream(ch, max_in_flight=4)
            calls = [asyncio.ensure_future(s.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), 10.0))
                     for _ in range(20)]
            await wait_until(lambda: held.started == 4, what="4 requests at the member")
            await asyncio.sleep(0.3)
            assert held.started == 4 and s.in_flight == 4 and kv.streams[0].received == 4
            held.release.set()
            await asyncio.gather(*calls)
            assert held.started == 20
        await server.stop(None)

    asyncio.run(main())


def test_a_slow_consumer_holds_up_only_its_own_stream():
    async def main() -> None:
        big = b"x" * (256 << 10)

        async def answer(kind: str, req: Any, timeout: float, out: Any) -> None:
            if req.key == b"big":
                out.kvs.add(key=req.key, value=big)  # a quarter MiB per answer fills the window fast
            else:
                out.kvs.add(key=req.key, value=b"small")

        server, addr, kv = await start_server(answer, max_in_flight=16)
        async with grpc.aio.insecure_channel(addr) as slow_ch, grpc.aio.insecure_channel(addr) as ch:
            slow = kv_pb2_grpc.KVStub(slow_ch).Session()
            for i in range(1, 201):
                await slow.write(kv_pb2.SessionRequest(id=i, range=kv_pb2.RangeRequest(key=b"big")))
            # ... and never reads. Its member-side writer stalls on flow control, its
            # slots stay taken, and the member stops reading that stream.
            # (gRPC's transport absorbs a few MiB of answers first: those count as written.)
            await wait_until(lambda: kv.streams and kv.streams[0].received >= 16, what="the slow stream read")
            stalled_at = -1
            while kv.streams[0].received != stalled_at:
                stalled_at = kv.streams[0].received
                await asyncio.sleep(0.5)
            assert stalled_at < 100  # of 200 sent: the member stopped reading
            # Meanwhile another stream is served at once.
            s = ClientStream(ch)
            t0 = time.monotonic()
            for _ in range(50):
                r = await s.call("range", kv_pb2.RangeRequest(key=b"ok"), 5.0)
                assert r.kvs[0].value == b"small"
            assert time.monotonic() - t0 < 5.0
            # The slow consumer reads at last and gets every answer.
            for a in await read_answers(slow, 200):
                assert len(a.range.kvs[0].value) == len(big)
            slow.cancel()
        await server.stop(None)

    asyncio.run(main())


def test_a_malformed_or_failing_request_gets_its_own_error_and_the_stream_goes_on():
    async def main() -> None:
        async def picky(kind: str, req: Any, timeout: float, out: Any) -> None:
            if kind == "put" and not req.key:
                raise InvalidRequest("key must not be empty")
            if kind == "put" and req.key == b"follower":
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "not leader: leader is member 2 at h:2",
                                    not_applied=True,
                                    metadata=(("kvstore-leader-id", "2"), ("kvstore-leader-addr", "h:2")))
            if kind == "put" and req.key == b"bug":
                raise KeyError("a bug")
            await echo(kind, req, timeout, out)

        server, addr, _ = await start_server(picky)
        async with grpc.aio.insecure_channel(addr) as ch:
            call = kv_pb2_grpc.KVStub(ch).Session()
            await call.write(kv_pb2.SessionRequest(id=1))  # no request at all
            await call.write(put_frame(0))  # no id
            await call.write(put_frame(3, key=b""))
            await call.write(put_frame(4, key=b"follower"))
            await call.write(put_frame(5, key=b"bug"))
            await call.write(put_frame(6, value=b"12345"))
            got = {a.id: a for a in await read_answers(call, 6)}
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        await server.stop(None)
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert got[1].error.code == invalid and "empty" in got[1].error.message and got[1].error.not_applied
        assert got[0].error.code == invalid and "id must be non-zero" in got[0].error.message
        assert got[3].error.code == invalid and got[3].error.message == "key must not be empty"
        e = got[4].error
        assert (e.code, e.leader_id, e.leader_addr, e.not_applied) == (
            grpc.StatusCode.UNAVAILABLE.value[0], 2, "h:2", True)
        assert got[5].error.code == grpc.StatusCode.INTERNAL.value[0] and not got[5].error.not_applied
        assert got[6].put.header.revision == 5

    asyncio.run(main())


def test_the_client_reads_a_request_error_as_the_unary_status_and_metadata():
    async def main() -> None:
        async def redirect(kind: str, req: Any, timeout: float, out: Any) -> None:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "not leader: leader is member 2 at h:2",
                                not_applied=True,
                                metadata=(("kvstore-leader-id", "2"), ("kvstore-leader-addr", "h:2")))

        server, addr, _ = await start_server(redirect)
        async with grpc.aio.insecure_channel(addr) as ch:
            s = ClientStream(ch)
            with pytest.raises(AttemptFailed) as ei:
                await s.call("put", kv_pb2.PutRequest(key=b"k"), 5.0)
            assert not s.broken
        await server.stop(None)
        e = ei.value
        assert e.code is grpc.StatusCode.UNAVAILABLE and not e.unreachable
        assert e.metadata == {"kvstore-not-applied": "1", "kvstore-leader-addr": "h:2", "kvstore-leader-id": "2"}

    asyncio.run(main())


def test_a_broken_stream_fails_sent_requests_as_outcome_unknown_and_queued_ones_as_not_applied():
    async def main() -> None:
        arrived = asyncio.Event()

        async def hang(kind: str, req: Any, timeout: float, out: Any) -> None:
            arrived.set()
            await asyncio.sleep(3600)

        server, addr, _ = await start_server(hang)
        ch = grpc.aio.insecure_channel(addr)
        s = ClientStream(ch)
        sent = asyncio.ensure_future(s.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), 30.0))
        await asyncio.wait_for(arrived.wait(), 10)
        await server.stop(None)  # the member goes away with the request in flight
        with pytest.raises(AttemptFailed) as ei:
            await asyncio.wait_for(sent, 10)
        assert "outcome unknown" in ei.value.details
        assert "kvstore-not-applied" not in ei.value.metadata and ei.value.unreachable
        assert s.broken
        # A stream that never connects has written nothing: certainly not applied.
        s2 = ClientStream(ch)
        with pytest.raises(AttemptFailed) as ei2:
            await s2.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), 30.0)
        assert ei2.value.metadata.get("kvstore-not-applied") == "1" and ei2.value.unreachable
        await ch.close()

    asyncio.run(main())


def test_a_stream_the_member_aborts_with_any_status_is_a_retryable_transport_failure():
    class Aborting(kv_pb2_grpc.KVServicer):
        async def Session(self, requests, context):  # type: ignore[no-untyped-def]
            await context.send_initial_metadata(())
            await requests.__aiter__().__anext__()
            await context.abort(grpc.StatusCode.INTERNAL, "RST_STREAM")

    async def main() -> None:
        server = grpc.aio.server()
        kv_pb2_grpc.add_KVServicer_to_server(Aborting(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            s = ClientStream(ch)
            with pytest.raises(AttemptFailed) as ei:
                await s.call("put", kv_pb2.PutRequest(key=b"k", value=b"v"), 5.0)
        await server.stop(None)
        e = ei.value
        assert e.code is grpc.StatusCode.UNAVAILABLE and e.unreachable  # the client's retry takes it from here
        assert "INTERNAL: RST_STREAM" in e.details and "outcome unknown" in e.details

    asyncio.run(main())


def packed(*frames: kv_pb2.SessionRequest) -> kv_pb2.SessionRequest:
    """The first request with the others packed behind it in ``more``, as the client writes them."""
    msg = kv_pb2.SessionRequest()
    msg.CopyFrom(frames[0])
    msg.more.extend(frames[1:])
    return msg


def test_packed_requests_are_each_answered_on_their_own_and_each_take_a_slot():
    async def main() -> None:
        held = Held()
        server, addr, kv = await start_server(held, max_in_flight=3)
        async with grpc.aio.insecure_channel(addr) as ch:
            call = kv_pb2_grpc.KVStub(ch).Session()
            await call.write(packed(*(put_frame(i, value=b"x" * i) for i in range(1, 6))))  # 5 in one message
            await call.write(put_frame(6))
            await wait_until(lambda: held.started >= 3, what="3 requests started")
            await asyncio.sleep(0.3)  # at the bound of 3, the rest of the message waits and nothing more is read
            assert held.started == 3 and kv.messages == 1
            held.release.set()
            answers = await read_answers(call, 6)
            assert kv.messages == 2 and kv.streams[0].received == 6
            assert {a.id for a in answers} == set(range(1, 7))
            assert all(a.WhichOneof("response") == "put" for a in answers)
            call.cancel()
        await server.stop(None)

    asyncio.run(main())


def test_a_packed_request_that_packs_more_is_refused_alone():
    async def main() -> None:
        server, addr, kv = await start_server(echo)
        async with grpc.aio.insecure_channel(addr) as ch:
            call = kv_pb2_grpc.KVStub(ch).Session()
            await call.write(packed(put_frame(1, value=b"a"), packed(put_frame(2), put_frame(3)),
                                    put_frame(4, value=b"abcd")))
            got = {a.id: a for a in await read_answers(call, 3)}
            await call.write(put_frame(5, value=b"abcde"))  # the stream goes on
            got.update({a.id: a for a in await read_answers(call, 1)})
            call.cancel()
        await server.stop(None)
        assert got[1].put.header.revision == 1 and got[4].put.header.revision == 4 and got[5].put.header.revision == 5
        assert got[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "may not carry `more`" in got[2].error.message and got[2].error.not_applied
        assert 3 not in got  # never a request of its own

    asyncio.run(main())


def test_the_client_packs_requests_waiting_together_into_one_message():
    async def main() -> None:
        server, addr, kv = await start_server(echo, max_in_flight=1000)
        async with grpc.aio.insecure_channel(addr) as ch:
            s = ClientStream(ch)
            reqs = [kv_pb2.PutRequest(key=b"k%d" % i, value=b"v" * i) for i in range(200)]
            got = await asyncio.gather(*(s.call("put", r, 10.0) for r in reqs))
            assert [g.header.revision for g in got] == list(range(200))  # each caller its own answer
            assert kv.streams[0].received == 200
            assert kv.messages < 20, kv.messages  # 200 callers at once: packed, not one message each
            one = await s.call("put", kv_pb2.PutRequest(key=b"alone", value=b"xyz"), 10.0)
            assert one.header.revision == 3
            s.close()
        await server.stop(None)

    asyncio.run(main())
