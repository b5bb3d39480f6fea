"""History and Watch on real nodes: reads at a revision, compaction, watches on followers,
resumption on another member after a kill, progress notifications, the CLI."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading

import grpc
import pytest

from kvstore.client import AsyncClient, Client, Compacted, FutureRevision, WatchCompacted
from kvstore.client.watch import WatchPosition
from kvstore.launcher import LocalCluster
from kvstore.v1 import kv_pb2, watch_pb2, watch_pb2_grpc

from server_cluster import kv_stub, settled

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def wcluster(tmp_path_factory):
    lc = LocalCluster.with_free_ports(str(tmp_path_factory.mktemp("watch")),
                                      extra_args=["--watch-progress-notify-interval", "1s"])
    lc.start()
    try:
        lc.wait_for_leader(60)
        yield lc
    finally:
        lc.stop()


def follower_of(lc: LocalCluster) -> int:
    leader = settled(lc)
    return next(i for i in lc.ids if i != leader)


def test_reads_at_a_revision_and_compaction_errors(wcluster):
    settled(wcluster)
    with Client(wcluster.endpoints) as c:
        r1 = c.put("hist/a", "1").revision
        c.put("hist/a", "2")
        c.delete("hist/a")
        assert c.get("hist/a", revision=r1).kv.value == b"1"
        assert c.get("hist/a", revision=r1 + 1).kv.value == b"2"
        assert c.get("hist/a", revision=r1 + 2).kv is None
        assert [kv.value for kv in c.range("hist/", prefix=True, revision=r1)] == [b"1"]
        with pytest.raises(FutureRevision, match="future revision"):
            c.get("hist/a", revision=r1 + 1000)
        c.compact(r1 + 1)
        with pytest.raises(Compacted, match="required revision has been compacted"):
            c.get("hist/a", revision=r1)
        with pytest.raises(Compacted):
            c.compact(r1)
        assert c.get("hist/a", revision=r1 + 1).kv.value == b"2"
    leader = settled(wcluster)
    kv = kv_stub(wcluster.client_addr(leader))
    with pytest.raises(grpc.RpcError) as e:
        kv.Range(kv_pb2.RangeRequest(key=b"hist/a", revision=r1), timeout=10)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "mvcc: required revision has been compacted" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        kv.Compact(kv_pb2.CompactionRequest(revision=10**9), timeout=10)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE and "future revision" in e.value.details()


def test_watch_on_a_follower_in_order_with_prev_kv_and_filters(wcluster):
    f = follower_of(wcluster)
    with Client(wcluster.endpoints) as c:
        start = c.put("w1/x", "0").revision
        stub = watch_pb2_grpc.WatchStub(grpc.insecure_channel(wcluster.client_addr(f)))
        reqs = [
            watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(
                key=b"w1/", range_end=b"w10", start_revision=start, prev_kv=True, watch_id=1)),
            watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(
                key=b"w1/", range_end=b"w10", start_revision=start, watch_id=2,
                filters=[watch_pb2.WatchCreateRequest.NOPUT])),
        ]
        gate = threading.Event()

        def requests():
            yield from reqs
            gate.wait(60)

        call = stub.Watch(requests(), timeout=60)
        c.put("w1/x", "1")
        c.put("elsewhere", "1")
        c.delete("w1/x")
        by_id: dict[int, list] = {1: [], 2: []}
        for resp in call:
            assert resp.header.member_id == f
            for ev in resp.events:
                by_id[resp.watch_id].append((ev.type, ev.kv.key, ev.kv.value, ev.kv.mod_revision, ev.prev_kv.value))
            if len(by_id[1]) >= 3 and len(by_id[2]) >= 1:
                break
        gate.set()
        call.cancel()
    P, D = watch_pb2.Event.PUT, watch_pb2.Event.DELETE
    assert by_id[1] == [(P, b"w1/x", b"0", start, b""), (P, b"w1/x", b"1", start + 1, b"0"),
                        (D, b"w1/x", b"", start + 3, b"1")]
    assert by_id[2] == [(D, b"w1/x", b"", start + 3, b"")]


def test_progress_request_and_cancel(wcluster):
    f = follower_of(wcluster)
    stub = watch_pb2_grpc.WatchStub(grpc.insecure_channel(wcluster.client_addr(f)))
    with Client(wcluster.endpoints) as c:
        rev = c.put("w7/k", "1").revision
    wcluster.wait_for(lambda: wcluster.status(f).header.revision >= rev, 30, "the follower applying it")
    reqs = [
        watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(key=b"w7/none", watch_id=5)),
        watch_pb2.WatchRequest(progress_request=watch_pb2.WatchProgressRequest()),
        watch_pb2.WatchRequest(cancel_request=watch_pb2.WatchCancelRequest(watch_id=5)),
        watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(key=b"")),
    ]
    out = list(stub.Watch(iter(reqs), timeout=30))
    assert (out[0].watch_id, out[0].created) == (5, True)
    progress = next(r for r in out if r.watch_id == -1)
    assert progress.header.revision >= rev and not progress.events
    cancelled = next(r for r in out if r.canceled and r.watch_id == 5)
    assert not cancelled.cancel_reason
    refused = next(r for r in out if r.created and r.canceled)
    assert refused.watch_id != 5 and "watch key must be" in refused.cancel_reason


def test_watch_from_a_compacted_revision_is_cancelled(wcluster):
    settled(wcluster)
    with Client(wcluster.endpoints) as c:
        r = c.put("w2/k", "1").revision
        c.put("w2/k", "2")
        c.compact(r + 1)
        with pytest.raises(WatchCompacted) as e:
            for _ in c.watch("w2/k", start_revision=r):
                pass
        assert e.value.compact_revision == r + 1
        events = c.watch("w2/k", start_revision=r + 1)
        assert next(events).value == b"2"
        events.close()


def test_progress_notify_moves_the_resume_point(wcluster):
    settled(wcluster)

    async def run():
        async with AsyncClient(wcluster.endpoints) as ac:
            rev = (await ac.put("w3/other", "x")).revision
            pos = WatchPosition(rev + 1)
            agen = ac.watch("w3/none", start_revision=rev + 1, progress_notify=True, position=pos)
            task = asyncio.ensure_future(agen.__anext__())
            for _ in range(5):
                await ac.put("w3/other", "y")
            deadline = asyncio.get_running_loop().time() + 30
            while pos.next_revision <= rev + 5 and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # (the position has no event to wait on)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await agen.aclose()
            return rev, pos.next_revision

    rev, nxt = asyncio.run(run())
    assert nxt > rev + 5  # told (by a progress notification) that nothing of its key happened


def test_watch_resumes_on_another_member_without_gap_or_duplicate(wcluster):
    """Kill the member serving the watch while writes go on: the stream goes on elsewhere."""
    settled(wcluster)
    n = 300
    with Client(wcluster.endpoints, timeout=30) as c:
        start = c.put("w4/k", "start").revision
        pos = WatchPosition(start)
        got: list[int] = []
        stop = threading.Event()

        def reader():
            for ev in c.watch("w4/", prefix=True, start_revision=start, position=pos):
                got.append(ev.revision)
                if ev.value == b"end" or stop.is_set():
                    break

        t = threading.Thread(target=reader)
        t.start()
        wcluster.wait_for(lambda: pos.endpoint is not None and len(got) > 0, 60, "the watch to start")
        served_by = next(i for i in wcluster.ids if wcluster.client_addr(i) == pos.endpoint)
        written = [start]
        for i in range(n):
            written.append(c.put("w4/k", str(i)).revision)
            if i == n // 3:
                wcluster.kill(served_by)
        written.append(c.put("w4/k", "end").revision)
        t.join(120)
        stop.set()
        assert not t.is_alive()
        assert pos.endpoint != wcluster.client_addr(served_by)
        assert got == written  # each revision once, in order, nothing missed
    wcluster.start_node(served_by)
    settled(wcluster)


def test_cli_get_rev_compact_and_watch(wcluster):
    settled(wcluster)
    env = dict(os.environ, KVSTORE_ENDPOINTS=",".join(wcluster.endpoints))
    kv = [sys.executable, "-m", "kvstore.cli", "--endpoints", ",".join(wcluster.endpoints)]
    with Client(wcluster.endpoints) as c:
        r = c.put("w5/k", "old").revision
        c.put("w5/k", "new")
    out = subprocess.run([*kv, "get", "w5/k", "--rev", str(r)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "old" in out.stdout, out.stderr
    watch = subprocess.Popen([*kv, "watch", "w5/", "--prefix", "--rev", str(r), "--prev-kv"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [watch.stdout.readline() for _ in range(4)]
    finally:
        watch.kill()
        watch.wait()
    assert lines[0].strip() == "PUT" and lines[1].strip() == "w5/k" and lines[2].strip() == "old"
    assert lines[3].strip() == "PUT"
    out = subprocess.run([*kv, "compact", str(r + 1)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and f"compacted revision {r + 1}" in out.stdout, out.stderr
    out = subprocess.run([*kv, "get", "w5/k", "--rev", str(r)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "required revision has been compacted" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_revision_larger_than_a_response_arrives_in_fragments(wcluster):
    f = follower_of(wcluster)
    big = 700 << 10
    with Client(wcluster.endpoints, timeout=20) as c:
        from kvstore.client.txn import Txn, put

        start = c.put("w6/marker", "0").revision
        rev = c.txn(Txn().then(put("w6/a", b"a" * big), put("w6/b", b"b" * big))).revision
        stub = watch_pb2_grpc.WatchStub(grpc.insecure_channel(wcluster.client_addr(f), options=[
            ("grpc.max_receive_message_length", 64 << 20)]))
        gate = threading.Event()

        def requests():
            yield watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(
                key=b"w6/", range_end=b"w60", start_revision=rev, fragment=True))
            gate.wait(60)

        pieces = []
        call = stub.Watch(requests(), timeout=60)
        for resp in call:
            if resp.events:
                pieces.append((resp.fragment, [(e.kv.key, len(e.kv.value), e.kv.mod_revision) for e in resp.events]))
                if not resp.fragment:
                    break
        gate.set()
        call.cancel()
        assert pieces == [(True, [(b"w6/a", big, rev)]), (False, [(b"w6/b", big, rev)])]
        # The client library puts the fragments back together.
        got = []
        for ev in c.watch("w6/", prefix=True, start_revision=start):
            got.append((ev.key, len(ev.value), ev.revision))
            if len(got) == 3:
                break
        assert got == [(b"w6/marker", 1, start), (b"w6/a", big, rev), (b"w6/b", big, rev)]


def test_auto_compaction_by_revision(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), extra_args=[
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10",
        "--auto-compaction-interval", "500ms"])
    lc.start()
    try:
        settled(lc)
        with Client(lc.endpoints, timeout=20) as c:
            first = c.put("ac/k", "0").revision
            for i in range(30):
                last = c.put("ac/k", str(i + 1)).revision

            def compacted():
                try:
                    c.get("ac/k", revision=first)
                except Compacted:
                    return True
                return None

            lc.wait_for(compacted, 60, "auto-compaction")
            assert c.get("ac/k", revision=last - 10).kv.value == str(last - 10 - first).encode()
    finally:
        lc.stop()


def test_a_watch_on_a_paused_follower_goes_on_when_it_catches_up(tmp_path):
    """A follower paused while 200 writes commit without it: its open watch delivers all of
    them, in order, once it has caught up (in one large applied batch)."""
    lc = LocalCluster.with_free_ports(str(tmp_path))
    lc.start()
    try:
        leader = settled(lc)
        f = next(i for i in lc.ids if i != leader)
        with Client([lc.client_addr(leader)], timeout=60) as c:
            start = c.put("snap/k", "start").revision
            stub = watch_pb2_grpc.WatchStub(grpc.insecure_channel(lc.client_addr(f)))
            gate = threading.Event()

            def requests():
                yield watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(
                    key=b"snap/", range_end=b"snap0", start_revision=start))
                gate.wait(240)

            call = stub.Watch(requests(), timeout=240)
            got: list[int] = []

            def read():
                for resp in call:
                    got.extend(ev.kv.mod_revision for ev in resp.events)
                    if got and got[-1] >= last[0]:
                        return

            last = [10**12]
            reader = threading.Thread(target=read)
            reader.start()
            lc.wait_for(lambda: got == [start], 60, "the first event")
            lc.pause(f)
            written = [start] + [c.put("snap/k", str(i)).revision for i in range(200)]
            last[0] = written[-1]
            lc.resume(f)
            reader.join(180)
            gate.set()
            call.cancel()
            assert not reader.is_alive()
            assert got == written
    finally:
        lc.stop()
