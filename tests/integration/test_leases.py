"""Leases on real node processes: the API, expiry by the leader, keep-alive, and failover.

Timing rules checked here (times on this test's monotonic clock):
  * never before TTL: a key is never read as gone before (send time of the
    last answered keep-alive) + TTL;
  * within TTL + election timeout: once keep-alives stop, it is gone by
    (answer time of the last keep-alive) + TTL + election timeout;
  * failover: a new leader starts every lease's clock afresh, so killing the
    leader right after a keep-alive does not expire the lease early. The
    same check on a cluster run with --testing-lease-deadlines-from-apply
    (each member starts a lease's clock when it applies the grant, and a new
    leader keeps that clock) does see the lease expire early.
"""
from __future__ import annotations

import time

import pytest

from kvstore.client import Client, ExponentialBackoff, InvalidArgument, KvstoreError, LeaseLost, NotFound
from kvstore.client.errors import FailedPrecondition
from kvstore.launcher import LocalCluster

from metrics_cluster import http_get, metric
from server_cluster import settled

pytestmark = pytest.mark.timeout(240)

ELECTION_S = 1.0  # the default --tick-ms 100 x --election-ticks 10
MIN_TTL = 2  # 1.5 election timeouts, rounded up


def client(lc: LocalCluster) -> Client:
    return Client(lc.endpoints, timeout=20, retry=ExponentialBackoff(base=0.02, cap=0.2, deadline=20))


def keep_alive_for(c: Client, lease_id: int, seconds: float, every: float) -> tuple[float, float]:
    """Keep the lease alive for `seconds`; (send time, answer time) of the last answered keep-alive."""
    end = time.monotonic() + seconds
    last = (0.0, 0.0)
    while True:
        sent = time.monotonic()
        assert c.lease_keep_alive_once(lease_id) > 0
        last = (sent, time.monotonic())
        if last[1] >= end:
            return last
        time.sleep(every)


def watch_until_gone(c: Client, key: str, limit_s: float) -> tuple[float, float]:
    """Read `key` (linearizable) until it is gone: (send time of the last read that saw it, answer time of
    the first that did not)."""
    deadline = time.monotonic() + limit_s
    seen = time.monotonic()
    while time.monotonic() < deadline:
        sent = time.monotonic()
        present = c.get(key).kv is not None
        if not present:
            return seen, time.monotonic()
        seen = sent
        time.sleep(0.02)
    raise AssertionError(f"{key} still present {limit_s:.0f}s later")


def test_grant_attach_time_to_live_list_revoke(cluster):
    settled(cluster)
    with client(cluster) as c:
        g = c.lease_grant(30)
        assert g.ttl == 30 and g.id > 0
        assert c.lease_grant(1).ttl == MIN_TTL  # raised to the minimum
        c.put("api/a", "1", lease=g.id)
        c.put("api/b", "2", lease=g.id)
        c.put("api/c", "3")
        assert c.get("api/a").kv.lease == g.id and c.get("api/c").kv.lease == 0
        ttl = c.lease_time_to_live(g.id, keys=True)
        assert ttl.granted_ttl == 30 and 25 <= ttl.ttl <= 30 and ttl.keys == [b"api/a", b"api/b"]
        assert g.id in c.leases()
        assert c.lease_keep_alive_once(g.id) == 30
        c.lease_revoke(g.id)
        assert c.get("api/a").kv is None and c.get("api/b").kv is None and c.get("api/c").kv is not None
        assert c.lease_time_to_live(g.id).ttl == -1
        assert c.lease_keep_alive_once(g.id) == 0
        assert g.id not in c.leases()
        with pytest.raises(NotFound, match="lease not found"):
            c.put("api/d", "4", lease=g.id)
        with pytest.raises(NotFound, match="lease not found"):
            c.lease_revoke(g.id)
        assert c.get("api/d").kv is None
        # bad input: a clear error each, nothing granted
        with pytest.raises(InvalidArgument, match="TTL is -1"):
            c.lease_grant(-1)
        with pytest.raises(InvalidArgument, match="lease ID is -5"):
            c.lease_grant(10, lease_id=-5)
        with pytest.raises(InvalidArgument, match="must be > 0"):
            c.lease_revoke(0)
        with pytest.raises(KvstoreError, match="too large; the limit is 9000000000 seconds"):
            c.lease_grant(10**10)
        held = c.lease_grant(10, lease_id=77)
        with pytest.raises(FailedPrecondition, match="lease already exists"):
            c.lease_grant(10, lease_id=77)
        c.lease_revoke(held.id)


def test_key_vanishes_after_keep_alives_stop_never_before_ttl(cluster):
    settled(cluster)
    with client(cluster) as c:
        ttl = 3
        g = c.lease_grant(ttl)
        c.put("exp/k", "v", lease=g.id)
        sent, answered = keep_alive_for(c, g.id, 2 * ttl, every=0.5)  # outlives its first TTL
        seen, gone = watch_until_gone(c, "exp/k", ttl + 30)
        print(f"lease ttl {ttl}s: gone {gone - sent:.2f}s after the last keep-alive was sent")
        assert gone >= sent + ttl, f"gone {sent + ttl - gone:.2f}s before its TTL ran out"
        assert gone <= answered + ttl + ELECTION_S, f"gone {gone - answered - ttl:.2f}s after its TTL"
        assert c.lease_time_to_live(g.id).ttl == -1
    leader = cluster.leader()
    _status, text = http_get(cluster.metrics_url(leader))
    assert (metric(text, "kvstore_server_lease_expired_total") or 0) >= 1, "the expiry is not counted"
    assert metric(text, "kvstore_server_leases") is not None


def test_context_manager_keeps_alive_reports_loss_and_revokes(cluster):
    settled(cluster)
    with client(cluster) as c:
        with c.lease(ttl=MIN_TTL) as lease:
            c.put("cm/k", "v", lease=lease.id)
            time.sleep(3 * MIN_TTL)  # kept alive in the background meanwhile
            assert lease.alive and c.get("cm/k").kv is not None
            lease.check()
        assert c.get("cm/k").kv is None  # revoked on exit
        assert not lease.lost.is_set()  # a close is not a loss

        lost = []
        with c.lease(ttl=3) as lease:
            lease.on_lost(lost.append)
            c.lease_revoke(lease.id)  # gone under its holder's feet
            assert lease.lost.wait(10), "the loss was not reported"
            assert not lease.alive and lost == [lease._lease]
            with pytest.raises(LeaseLost, match="no such lease"):
                lease.check()


def failover_times(lc: LocalCluster, ttl: int) -> tuple[float, float, float]:
    """Grant a lease, keep it alive past its TTL, kill the leader right after a keep-alive and stop.
    (send time of that keep-alive, answer time of the first read that found the key gone, kill time)."""
    leader = settled(lc)
    with client(lc) as c:
        g = c.lease_grant(ttl)
        c.put("fo/k", "v", lease=g.id)
        sent, _answered = keep_alive_for(c, g.id, ttl + 2, every=0.5)
        lc.kill(leader)
        killed = time.monotonic()
        _seen, gone = watch_until_gone(c, "fo/k", ttl + 60)
    lc.start_node(leader)
    return sent, gone, killed


def test_failover_does_not_expire_a_lease_early(cluster):
    ttl = 4
    sent, gone, killed = failover_times(cluster, ttl)
    print(f"failover, lease ttl {ttl}s: gone {gone - sent:.2f}s after the last keep-alive was sent")
    assert gone >= sent + ttl, f"gone {sent + ttl - gone:.2f}s before its TTL ran out"
    # the new leader grants a full TTL from its election: gone within TTL + a few election timeouts
    assert gone <= killed + ttl + 10 * ELECTION_S


def test_failover_check_catches_clocks_started_at_apply(tmp_path):
    """The teeth of the test above: members whose lease clocks start at apply expire it early."""
    lc = LocalCluster.with_free_ports(str(tmp_path / "c"), extra_args=["--testing-lease-deadlines-from-apply"])
    lc.start()
    try:
        lc.wait_for_leader(60)
        ttl = 4
        sent, gone, _killed = failover_times(lc, ttl)
        print(f"clocks from apply, lease ttl {ttl}s: gone {gone - sent:.2f}s after the last keep-alive was sent")
        assert gone < sent + ttl, "the broken lessor was not caught"
    finally:
        lc.stop()


def test_cli(cluster):
    import re

    from click.testing import CliRunner

    from kvstore.cli import main

    settled(cluster)
    endpoints = ",".join(cluster.endpoints)

    def run(*args: str, code: int = 0) -> str:
        r = CliRunner().invoke(main, ["--endpoints", endpoints, "--timeout", "20", *args])
        assert r.exit_code == code, r.output
        return r.output

    out = run("lease", "grant", "60")
    m = re.fullmatch(r"lease ([0-9a-f]{16}) granted with TTL\(60s\)\n", out)
    assert m, out
    lid = m.group(1)
    run("put", "cli/a", "1", "--lease", lid)
    assert re.fullmatch(rf"lease {lid} granted with TTL\(60s\), remaining\(\d+s\), attached keys\(\[cli/a\]\)\n",
                        run("lease", "timetolive", lid, "--keys"))
    assert run("lease", "keep-alive", "--once", lid) == f"lease {lid} keepalived with TTL(60)\n"
    assert lid in run("lease", "list").split()
    assert run("lease", "revoke", lid) == f"lease {lid} revoked\n"
    assert run("get", "cli/a", code=1).strip().endswith("not found")
    assert run("lease", "timetolive", lid) == f"lease {lid} already expired\n"
    assert "lease not found" in run("put", "cli/b", "2", "--lease", lid, code=1)
    assert f"lease {lid} expired or revoked" in run("lease", "keep-alive", lid, code=1)
    assert "not a lease id" in run("lease", "revoke", "xyz", code=2)
    assert "not a lease id" in run("put", "cli/b", "2", "--lease", "-5", code=1)


def test_past_the_space_quota_grants_are_refused_and_revokes_free_space(tmp_path):
    from kvstore.client.errors import ResourceExhausted

    lc = LocalCluster.with_free_ports(str(tmp_path / "c"), extra_args=["--quota-backend-bytes", str(2 << 20)])
    lc.start()
    try:
        settled(lc)
        with client(lc) as c:
            g = c.lease_grant(60)
            with pytest.raises(ResourceExhausted):
                for i in range(200):
                    c.put(f"big/{i:03d}", b"x" * (64 << 10), lease=g.id)
            lc.wait_for(lambda: any(a == "NOSPACE" for _, a in c.alarms()), 30, "the NOSPACE alarm")
            with pytest.raises(ResourceExhausted, match="--quota-backend-bytes"):
                c.lease_grant(60)
            c.lease_revoke(g.id)  # allowed, and it frees the space its keys held
            assert c.range("big/", prefix=True, count_only=True).count == 0
            c.compact(c.get("big/000").revision)

            def granted():
                try:
                    return c.lease_grant(60).id
                except ResourceExhausted:
                    return None

            lc.wait_for(granted, 60, "grants to be accepted again")
    finally:
        lc.stop()


def test_a_watch_sees_an_expired_leases_keys_deleted_at_one_revision(cluster):
    settled(cluster)
    with client(cluster) as c:
        g = c.lease_grant(MIN_TTL)
        start = c.put("wl/a", "1", lease=g.id).revision
        c.put("wl/b", "2", lease=g.id)
        deletes = []
        for ev in c.watch("wl/", prefix=True, start_revision=start, prev_kv=True):  # no keep-alives: it expires
            if ev.type == "DELETE":
                deletes.append((ev.key, ev.revision, ev.prev_kv.value if ev.prev_kv else None))
                if len(deletes) == 2:
                    break
        assert [d[0] for d in deletes] == [b"wl/a", b"wl/b"] and deletes[0][1] == deletes[1][1]
        assert [d[2] for d in deletes] == [b"1", b"2"]
