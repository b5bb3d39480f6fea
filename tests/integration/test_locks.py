"""Locks (fencing tokens, waiting by watch, release by lease expiry) and elections on real nodes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvstore.client import Client, ExponentialBackoff
from kvstore.client.election import NotElected
from kvstore.client.txn import Txn, put

from server_cluster import settled

pytestmark = pytest.mark.timeout(240)


def client(lc) -> Client:
    return Client(lc.endpoints, timeout=20, retry=ExponentialBackoff(base=0.02, cap=0.2, deadline=20))


def test_one_holder_at_a_time_and_tokens_strictly_increase(cluster):
    settled(cluster)
    held: list[tuple[float, float, int]] = []
    errors: list[BaseException] = []
    with client(cluster) as c:
        def worker() -> None:
            try:
                for _ in range(3):
                    with c.lock("mx/a", ttl=5) as lk:
                        entered = time.monotonic()
                        time.sleep(0.05)
                        held.append((entered, time.monotonic(), lk.token))
            except BaseException as e:  # asserted below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    held.sort()
    assert len(held) == 9
    for (_, left, tok), (entered, _, nxt) in zip(held, held[1:]):
        assert entered >= left, "two holders at once"
        assert nxt > tok, "tokens must increase with each acquisition"


def test_a_waiter_watches_instead_of_polling(cluster):
    settled(cluster)
    with client(cluster) as c, client(cluster) as c2:
        ranges = []
        inner = c2.async_client.range

        async def counting_range(*a, **kw):
            ranges.append(a)
            return await inner(*a, **kw)

        c2.async_client.range = counting_range  # type: ignore[method-assign]
        first = c.lock("mx/b", ttl=5).acquire()
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(c2.lock("mx/b", ttl=5).acquire().token))
        waiter.start()
        time.sleep(3)  # the waiter waits on its predecessor's key all this while
        assert not got and len(ranges) == 1
        first_token = first.token
        first.release()
        waiter.join(30)
        assert got and got[0] > first_token
        assert len(ranges) == 2  # one look after the predecessor's key was deleted


def test_the_guard_refuses_a_holder_whose_lock_passed_on(cluster):
    settled(cluster)
    with client(cluster) as c:
        a = c.lock("mx/c", ttl=5).acquire()
        c.lease_revoke(a.lease.id)  # as if a paused holder's lease ran out
        b = c.lock("mx/c", ttl=5).acquire(timeout=20)
        assert b.token > a.token
        assert not c.txn(Txn().when(a.guard()).then(put("mx/c-data", "stale")))
        assert c.txn(Txn().when(b.guard()).then(put("mx/c-data", "fresh")))
        assert c.get("mx/c-data").value == b"fresh"
        b.release()
        a.release()  # its lease is gone: nothing to do, no error


def test_a_dead_holder_releases_through_lease_expiry_and_the_cli_passes_the_token(cluster, tmp_path):
    settled(cluster)
    ttl = 3
    out = tmp_path / "token"
    env = {**os.environ, "KVSTORE_ENDPOINTS": ",".join(cluster.endpoints)}
    holder = subprocess.Popen(
        [sys.executable, "-m", "kvstore.cli", "lock", "--ttl", str(ttl), "mx/d", "--",
         "sh", "-c", f"echo $KVSTORE_LOCK_TOKEN > {out}; sleep 120"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().strip()):
            assert time.monotonic() < deadline and holder.poll() is None, "the CLI never ran its command"
            time.sleep(0.05)
        dead_token = int(out.read_text())
        os.killpg(holder.pid, signal.SIGKILL)  # the holder and its command die; nobody releases
        killed = time.monotonic()
        with client(cluster) as c:
            lk = c.lock("mx/d", ttl=5).acquire(timeout=60)
            waited = time.monotonic() - killed
            assert lk.token > dead_token
            assert waited < ttl + 5, f"took {waited:.1f}s to take over from a dead holder"
            lk.release()
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "lock", "mx/e", "--", "sh", "-c",
                        "echo token=$KVSTORE_LOCK_TOKEN; exit 3"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3 and r.stdout.startswith("token=") and int(r.stdout.split("=")[1]) > 0


def test_election_campaign_proclaim_observe_resign(cluster):
    settled(cluster)
    with client(cluster) as c:
        a = c.election("el/x", ttl=5)
        b = c.election("el/x", ttl=5)
        a.campaign("a1")
        assert c.election("el/x").leader().value == b"a1"
        seen: list[bytes] = []
        observer = c.election("el/x")

        def observe() -> None:
            for kv in observer.observe():
                seen.append(kv.value)
                if kv.value == b"b1":
                    return

        watcher = threading.Thread(target=observe, daemon=True)
        watcher.start()
        won = threading.Event()
        campaigner = threading.Thread(target=lambda: (b.campaign("b1"), won.set()))
        campaigner.start()
        time.sleep(1)
        assert not won.is_set()  # a leads
        a.proclaim("a2")
        a.resign()
        assert won.wait(30), "b never took over"
        with pytest.raises(NotElected):
            a.proclaim("a3")
        watcher.join(30)
        assert seen[0] == b"a1" and seen[-1] == b"b1" and b"a2" in seen
        assert c.election("el/x").leader().value == b"b1"
        b.resign()
        assert c.election("el/x").leader() is None


def test_elect_cli_campaigns_and_observes(cluster):
    settled(cluster)
    env = {**os.environ, "KVSTORE_ENDPOINTS": ",".join(cluster.endpoints), "PYTHONUNBUFFERED": "1"}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "kvstore.cli", "elect", "--ttl", "3", "el/cli", *args],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def next_value(proc: subprocess.Popen) -> str:
        key = proc.stdout.readline()  # the leader's key, then its proclamation
        assert key.startswith("el/cli/"), (key, proc.stderr.read() if proc.poll() is not None else "")
        return proc.stdout.readline().strip()

    observer = start()
    a = start("host-a")
    b = None
    try:
        assert next_value(a) == "host-a"  # a leads
        assert next_value(observer) == "host-a"
        b = start("host-b")
        time.sleep(1)
        assert b.poll() is None  # b waits behind a
        a.send_signal(signal.SIGINT)  # a resigns on Ctrl-C
        assert a.wait(60) == 0  # resign, revoke and close, each bounded by the client timeout
        assert next_value(b) == "host-b"
        assert next_value(observer) == "host-b"
    finally:
        for p in (observer, a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def test_a_waiter_whose_lease_is_lost_gives_up_at_once(cluster):
    from kvstore.client import LeaseLost

    settled(cluster)
    with client(cluster) as c:
        holder = c.lock("mx/f", ttl=5).acquire()
        before = set(c.leases())
        outcome: list[BaseException | int] = []

        def wait() -> None:
            try:
                outcome.append(c.lock("mx/f", ttl=3).acquire().token)
            except BaseException as e:  # asserted below
                outcome.append(e)

        waiter = threading.Thread(target=wait)
        waiter.start()
        theirs = cluster.wait_for(lambda: (set(c.leases()) - before) or None, 30, "the waiter's lease")
        time.sleep(0.5)  # queued and watching its predecessor
        c.lease_revoke(theirs.pop())
        waiter.join(10)
        assert not waiter.is_alive(), "the waiter kept waiting on a lost lease"
        assert isinstance(outcome[0], LeaseLost), outcome
        assert c.txn(Txn().when(holder.guard()).then(put("mx/f-data", "still mine")))
        holder.release()


def test_locks_and_campaigns_can_share_one_lease(cluster):
    """As etcd's sessions: one lease under several locks and a campaign; revoking it frees them all."""
    settled(cluster)
    with client(cluster) as c:
        with c.lease(ttl=5) as lease:
            a = c.lock("mx/g1", lease=lease).acquire()
            b = c.lock("mx/g2", lease=lease).acquire()
            e = c.election("el/g", lease=lease)
            e.campaign("me")
            assert {a.key, b.key, e.key} == {f"mx/g1/{lease.id:x}".encode(), f"mx/g2/{lease.id:x}".encode(),
                                             f"el/g/{lease.id:x}".encode()}
            c.lease_revoke(lease.id)
            assert c.range("mx/g", prefix=True, count_only=True).count == 0 and e.leader() is None
            a.release()
            b.release()
