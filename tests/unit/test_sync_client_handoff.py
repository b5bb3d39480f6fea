"""The blocking Client's hand-off: calls from many threads meet on one loop, woken once per batch of calls."""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from client_fake_cluster import FakeCluster
from kvstore.client import Client, errors


def hold_loop(c: Client) -> threading.Event:
    """Block the client's loop thread until the returned event is set; return once it is blocked."""
    release, blocked = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(30)

    c._loop.call_soon_threadsafe(block)
    assert blocked.wait(10)
    return release


def wait_queued(c: Client, n: int) -> None:
    """Until n calls wait in the client's queue for the (held) loop."""
    deadline = time.monotonic() + 10
    while len(c._submitted) < n:
        assert time.monotonic() < deadline, f"{len(c._submitted)} of {n} calls queued"
        time.sleep(0.005)


def count_drains(c: Client) -> list[int]:
    drains = [0]
    inner = c._drain

    def drain() -> None:
        drains[0] += 1
        inner()

    c._drain = drain  # type: ignore[method-assign]
    return drains


def test_calls_queued_while_the_loop_is_busy_start_in_one_drain_and_leave_in_one_batch():
    n = 24
    with FakeCluster(leader=1) as fc, Client(fc.endpoints) as c:
        c.put("warm", "x")
        co = c.async_client.coalescer
        assert co is not None
        drains = count_drains(c)
        rpcs0, ops0 = co.rpcs, co.ops
        release = hold_loop(c)
        results: dict[int, object] = {}

        def caller(i: int) -> None:
            results[i] = c.put(f"k{i}", f"v{i}") if i % 2 else c.get("warm")

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        wait_queued(c, n)  # none can start while the loop is held
        release.set()
        for t in threads:
            t.join(10)
        assert len(results) == n
        assert drains[0] == 1, f"{drains[0]} loop wakeups for {n} calls queued together"
        assert (co.rpcs - rpcs0, co.ops - ops0) == (1, n), "the calls did not leave as one batch"
        for i in range(1, n, 2):
            assert c.get(f"k{i}").value == f"v{i}".encode()
        assert all(results[i].value == b"x" for i in range(0, n, 2))  # type: ignore[attr-defined]


def test_many_threads_each_get_their_own_answer():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints) as c:
        errors_seen: list[BaseException] = []

        def caller(i: int) -> None:
            try:
                for j in range(30):
                    rev = c.put(f"t{i}", f"{j}").revision
                    got = c.get(f"t{i}")
                    assert got.value == f"{j}".encode() and got.kv is not None and got.kv.mod_revision == rev
            except BaseException as e:  # reported below: an assert in a thread fails nothing by itself
                errors_seen.append(e)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors_seen, errors_seen[0]
        co = c.async_client.coalescer
        assert co is not None and co.ops > co.rpcs  # threads' calls shared batches


def test_a_bad_argument_fails_its_own_call_only():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints) as c:
        release = hold_loop(c)
        out: dict[str, object] = {}

        def bad() -> None:
            try:
                c.put(12345, "v")  # type: ignore[arg-type]
            except TypeError as e:
                out["bad"] = e

        def good() -> None:
            out["good"] = c.put("fine", "v").revision

        threads = [threading.Thread(target=bad), threading.Thread(target=good)]
        for t in threads:
            t.start()
        wait_queued(c, 2)
        release.set()
        for t in threads:
            t.join(10)
        assert isinstance(out.get("bad"), TypeError) and isinstance(out.get("good"), int)


def test_an_op_refused_in_a_batch_raises_its_typed_error_in_its_caller_alone():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, timeout=5) as c:
        release = hold_loop(c)
        out: dict[str, object] = {}

        def call(name: str, key: str) -> None:
            try:
                out[name] = c.put(key, "v").revision
            except errors.KvstoreError as e:
                out[name] = e

        threads = [threading.Thread(target=call, args=("bad", "bad-key")),
                   threading.Thread(target=call, args=("good", "good-key"))]
        for t in threads:
            t.start()
        wait_queued(c, 2)
        release.set()
        for t in threads:
            t.join(10)
        assert isinstance(out["bad"], errors.InvalidArgument), out
        assert isinstance(out["good"], int), out
        assert fc.total_calls("Batch") == 1  # the two went out together


def test_calls_after_close_are_refused():
    with FakeCluster(leader=1) as fc:
        c = Client(fc.endpoints)
        c.put("k", "v")
        c.close()
        with pytest.raises(errors.ClientClosed):
            c.put("k", "v")
        with pytest.raises(errors.ClientClosed):
            c.get("k")


def test_each_thread_has_one_wakeup_and_gives_it_back_when_it_ends():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints) as c:
        c.put("warm", "x")
        gc.collect()
        fds = len(os.listdir("/proc/self/fd"))

        def caller() -> None:
            for _ in range(5):
                c.put("k", "v")

        for _ in range(3):  # 3 generations of 20 threads: a leak would grow by 60 descriptors
            threads = [threading.Thread(target=caller) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) <= fds + 2


def test_without_a_descriptor_to_spare_a_thread_waits_on_a_lock(monkeypatch):
    def no_fds(*args: object) -> int:
        raise OSError(24, "Too many open files")

    with FakeCluster(leader=1) as fc, Client(fc.endpoints) as c:
        monkeypatch.setattr(os, "eventfd", no_fds)
        monkeypatch.setattr(os, "pipe", no_fds)
        out: list[object] = []
        t = threading.Thread(target=lambda: out.extend([c.put("k", "v"), c.get("k")]))
        t.start()
        t.join(10)
        assert len(out) == 2 and out[1].value == b"v"  # type: ignore[attr-defined]
