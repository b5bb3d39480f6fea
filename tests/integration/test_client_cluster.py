"""The client against a real 3-node cluster: redirects, failover, pauses, exactly-once, threads.

One cluster serves the whole module; a test that kills or pauses a member
brings it back and waits until all three agree on a leader again.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from kvstore.client import AsyncClient, Client, ExponentialBackoff
from kvstore.client.txn import Txn, put, value, version
from kvstore.v1 import kv_pb2, kv_pb2_grpc
from server_cluster import settled  # the `cluster` fixture comes from conftest.py

pytestmark = pytest.mark.timeout(120)


def raw_linearizable_get(addr: str, key: bytes, timeout: float = 3.0):
    """A linearizable Range straight to one member, bypassing the client library."""
    with grpc.insecure_channel(addr) as ch:
        return kv_pb2_grpc.KVStub(ch).Range(kv_pb2.RangeRequest(key=key), timeout=timeout)


def test_redirection_from_each_follower(cluster):
    leader = settled(cluster)
    for f in [i for i in cluster.ids if i != leader]:
        with Client([cluster.client_addr(f)], timeout=10) as c:
            c.put(f"redirect/{f}", str(f))
            assert c.leader == cluster.client_addr(leader)
            assert c.get(f"redirect/{f}").value == str(f).encode()
            c.members()
            assert set(c.endpoints) == set(cluster.endpoints)


def test_retried_cas_is_applied_once_and_the_caller_sees_the_first_result(cluster):
    settled(cluster)
    dropped: list[int] = []

    def lose_first_txn_reply(method, request):
        if method == "Txn" and not dropped:
            dropped.append(request.request_id.seq)
            return True
        return False

    with Client(cluster.endpoints, timeout=10, testing_drop_reply_after_send=lose_first_txn_reply) as c:
        c.put("cas/x", "0")
        before = c.get("cas/x").kv
        r = c.txn(Txn().when(value("cas/x") == "0").then(put("cas/x", "1")).otherwise(put("cas/x", "again")))
        assert dropped, "the fault hook did not fire"
        assert r.succeeded  # the server answered the retry with the first result
        after = c.get("cas/x").kv
    assert after.value == b"1"
    assert after.version == before.version + 1  # applied exactly once
    assert after.mod_revision == r.revision


def test_sync_client_from_16_threads(cluster):
    settled(cluster)
    failures: list[BaseException] = []
    with Client(cluster.endpoints, timeout=15) as c:

        def worker(t: int) -> None:
            try:
                for i in range(40):
                    c.put(f"threads/{t:02}/{i:02}", f"{t}:{i}")
                    assert c.get(f"threads/{t:02}/{i:02}").value == f"{t}:{i}".encode()
                r = c.txn(Txn().when(version(f"threads/{t:02}/00") > 0).then(put(f"threads/{t:02}/done", "y")))
                assert r.succeeded
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not failures, failures[:3]
        assert c.range("threads/", prefix=True, count_only=True).count == 16 * 41


def test_leader_killed_during_a_stream_of_writes_loses_nothing(cluster):
    old = settled(cluster)
    acked: dict[str, str] = {}
    killed_at: list[int] = []

    async def main() -> None:
        retry = ExponentialBackoff(base=0.02, cap=0.25, attempt_timeout=1.0)
        async with AsyncClient(cluster.endpoints, timeout=20, retry=retry) as c:

            async def writer(w: int) -> None:
                for i in range(10_000):
                    if killed_at and len(acked) >= killed_at[0] + 200:
                        return
                    k, v = f"stream/{w}/{i:05}", f"{w}.{i}"
                    await c.put(k, v)  # any error fails the test: the deadline must cover failover
                    acked[k] = v
                    if not killed_at and len(acked) >= 200:
                        killed_at.append(len(acked))
                        # kill -9 from a thread so the writers keep the loop busy meanwhile
                        await asyncio.get_running_loop().run_in_executor(None, cluster.kill, old)

            await asyncio.gather(*(writer(w) for w in range(8)))
            assert killed_at and len(acked) >= killed_at[0] + 200
            assert c.leader != cluster.client_addr(old)

            got = await c.range("stream/", prefix=True)
            stored = {kv.key.decode(): kv.value.decode() for kv in got.kvs}
            missing = [k for k in acked if stored.get(k) != acked[k]]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"

    asyncio.run(main())
    settled(cluster)  # restarts the killed member and waits for it to catch up


def test_paused_old_leader_does_not_serve_linearizable_reads(cluster):
    old = settled(cluster)
    old_addr = cluster.client_addr(old)
    retry = ExponentialBackoff(base=0.02, cap=0.25, attempt_timeout=1.0)
    with Client(cluster.endpoints, timeout=20, retry=retry) as c:
        c.put("paused/k", "before")
        cluster.pause(old)  # SIGSTOP: its sockets stay open, it just stops answering
        try:
            c.put("paused/k", "after")  # succeeds through the new leader within the deadline
            assert c.leader != old_addr
            assert c.get("paused/k").value == b"after"
            new = cluster.wait_for_leader(30, exclude=old)
            assert new != old
        finally:
            cluster.resume(old)
        # The old leader wakes up still believing it leads. A linearizable read
        # there must not return the stale value: it refuses (redirect / no
        # leader) or answers with the fresh one. Only a timeout is asked again.
        deadline = time.monotonic() + 15
        while True:
            assert time.monotonic() < deadline, "the old leader never answered"
            try:
                r = raw_linearizable_get(old_addr, b"paused/k")
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                break
            assert r.kvs and r.kvs[0].value == b"after", "stale read from a deposed leader"
            break
        with Client([old_addr], timeout=20, retry=retry) as only_old:
            assert only_old.get("paused/k").value == b"after"
    settled(cluster)
