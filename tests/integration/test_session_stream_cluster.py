"""Session streams against real member processes: malformed messages, and a leader killed mid-stream.

One cluster serves the module; the kill test restarts the member and waits
until all three agree again.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from kvstore.client import AsyncClient
from kvstore.client.types import prefix_end
from kvstore.v1 import kv_pb2, kv_pb2_grpc
from server_cluster import settled  # the `cluster` fixture comes from conftest.py

pytestmark = pytest.mark.timeout(180)

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_malformed_requests_get_their_own_error_while_the_stream_and_member_go_on(cluster):
    leader = settled(cluster)
    addr = cluster.client_addr(leader)

    async def main() -> dict[int, kv_pb2.SessionAnswer]:
        async with grpc.aio.insecure_channel(addr) as ch:
            call = kv_pb2_grpc.KVStub(ch).Session()
            P, R = kv_pb2.PutRequest, kv_pb2.RangeRequest
            requests = [
                kv_pb2.SessionRequest(id=1),  # no request
                kv_pb2.SessionRequest(id=0, put=P(key=b"k", value=b"v")),  # no id
                kv_pb2.SessionRequest(id=3, put=P(key=b"", value=b"v")),
                kv_pb2.SessionRequest(id=4, put=P(key=b"x" * 600, value=b"v")),
                kv_pb2.SessionRequest(id=5, range=R(key=b"b", range_end=b"a")),
                kv_pb2.SessionRequest(id=6, batch=kv_pb2.BatchRequest(
                    ops=[kv_pb2.RequestOp(request_put=P(key=b"k", value=b"v"))] * 1100)),
                kv_pb2.SessionRequest(id=7, batch=kv_pb2.BatchRequest(ops=[
                    kv_pb2.RequestOp(request_put=P(key=b"stream/ok", value=b"1")),
                    kv_pb2.RequestOp(),  # an empty op: its own error, the other op goes on
                ])),
                kv_pb2.SessionRequest(id=8, put=P(key=b"stream/after", value=b"fine")),
            ]
            for r in requests:
                await call.write(r)
            await call.done_writing()
            got = {}
            while True:
                r = await call.read()
                if r is grpc.aio.EOF:
                    break
                got.update((a.id, a) for a in r.answers)
            assert await call.code() == grpc.StatusCode.OK
            return got

    got = asyncio.run(main())
    assert sorted(got) == [0, 1, 3, 4, 5, 6, 7, 8]
    assert got[1].error.code == INVALID and "session request is empty" in got[1].error.message
    assert got[0].error.code == INVALID and "id must be non-zero" in got[0].error.message
    assert got[3].error.code == INVALID and got[3].error.message == "key must not be empty"
    assert got[4].error.code == INVALID and "--max-key-bytes" in got[4].error.message
    assert got[5].error.code == INVALID and "inverted range" in got[5].error.message
    assert got[6].error.code == INVALID and "--max-batch-ops" in got[6].error.message
    assert all(got[i].error.not_applied for i in (0, 1, 3, 4, 5, 6))
    results = got[7].batch.results
    assert results[0].WhichOneof("result") == "response" and results[1].error.code == INVALID
    assert got[8].WhichOneof("response") == "put" and got[8].put.header.revision > 0
    # The member still serves, and nothing refused was applied.
    with grpc.insecure_channel(addr) as ch:
        kv = kv_pb2_grpc.KVStub(ch)
        assert kv.Range(kv_pb2.RangeRequest(key=b"stream/after"), timeout=5).kvs[0].value == b"fine"
        assert kv.Range(kv_pb2.RangeRequest(key=b"k"), timeout=5).count == 0


def test_bytes_that_are_no_session_request_end_only_that_stream(cluster):
    leader = settled(cluster)
    addr = cluster.client_addr(leader)

    async def main() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(addr) as ch:
            raw = ch.stream_stream("/kvstore.v1.KV/Session", request_serializer=lambda b: b,
                                   response_deserializer=kv_pb2.SessionResponse.FromString)
            call = raw()
            await call.write(b"\x0a\xff\xff\xff\xff\x0f")  # a field claiming 4 GiB that never come
            await call.done_writing()
            return await call.code()

    assert asyncio.run(main()) != grpc.StatusCode.OK
    with grpc.insecure_channel(addr) as ch:
        r = kv_pb2_grpc.KVStub(ch).Put(kv_pb2.PutRequest(key=b"stream/alive", value=b"1"), timeout=5)
    assert r.header.revision > 0


@pytest.mark.parametrize("coalesce", [False, True], ids=["one-op-per-message", "coalesced"])
def test_leader_killed_with_writes_in_flight_applies_each_exactly_once(cluster, coalesce):
    leader = settled(cluster)
    prefix = f"kill/{int(coalesce)}/"

    async def main() -> tuple[dict[bytes, bytes], int]:
        acked: dict[bytes, bytes] = {}
        in_flight_at_kill = 0
        async with AsyncClient(cluster.endpoints, coalesce=coalesce, timeout=30) as kv:
            await kv.put(b"warm", b"x")
            stop = asyncio.Event()
            started = [0]

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    k, v = f"{prefix}{w}/{n}".encode(), f"{w}.{n}".encode()
                    started[0] += 1
                    await kv.put(k, v)
                    acked[k] = v
                    n += 1

            tasks = [asyncio.ensure_future(writer(w)) for w in range(32)]
            await asyncio.sleep(0.5)
            in_flight_at_kill = started[0] - len(acked)
            await asyncio.to_thread(cluster.kill, leader)  # SIGKILL with writes in flight on the stream
            n_at_kill = len(acked)
            deadline = asyncio.get_running_loop().time() + 60
            while len(acked) < n_at_kill + 200:  # writes go on through the election
                if asyncio.get_running_loop().time() > deadline or all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)  # a writer's error (none expected) fails the test here
            assert len(acked) >= n_at_kill + 200, f"writes stalled after the kill: {len(acked) - n_at_kill} acked"
        return acked, in_flight_at_kill

    acked, in_flight = asyncio.run(main())
    assert in_flight > 0
    cluster.start_node(leader)
    settled(cluster)
    with grpc.insecure_channel(cluster.client_addr(cluster.wait_for_leader(60))) as ch:
        everything = kv_pb2.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix.encode()))
        resp = kv_pb2_grpc.KVStub(ch).Range(everything, timeout=10)
    stored = {kv.key: kv for kv in resp.kvs}
    assert set(stored) == set(acked)  # every write the writers sent was acknowledged, none lost
    for k, v in acked.items():
        assert stored[k].value == v
        assert stored[k].version == 1, f"{k!r} was applied {stored[k].version} times"
