"""Leader discovery, redirects, failures and exactly-once retries against a fault-injecting server."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from client_fake_cluster import FakeCluster
from kvstore.client import AsyncClient, Client, errors
from kvstore.client.retry import ExponentialBackoff, FixedInterval
from kvstore.client.txn import Txn, put, value


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.parametrize("follower", [2, 3])
def test_follower_redirect_goes_straight_to_the_leader(follower):
    with FakeCluster(leader=1) as fc:
        # A 5 s backoff would blow the 2 s deadline: the redirect must not wait.
        with Client([fc.node(follower).addr], timeout=2.0, retry=FixedInterval(interval=5.0)) as c:
            t0 = time.monotonic()
            c.put("k", "v")
            assert time.monotonic() - t0 < 1.0
            assert c.leader == fc.node(1).addr
            assert fc.node(follower).calls.get("Put", 0) == 1 and fc.node(1).calls["Put"] == 1
            c.get("k")  # linearizable read: straight to the cached leader now
            assert fc.node(follower).calls.get("Range", 0) == 0
            # The redirect also triggered a member-list refresh: every member is known.
            wait_for(lambda: set(c.endpoints) == set(fc.endpoints), what="members learned")


def test_leader_change_is_followed():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints) as c:
        c.put("a", "1")
        assert c.leader == fc.node(1).addr
        fc.leader_id = 3
        c.put("a", "2")
        assert c.leader == fc.node(3).addr
        assert c.get("a").value == b"2"


def put_while_no_leader_then_elect(fc, c) -> list:
    """Start a put with no leader, wait until every member has refused it twice, elect member 2."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(c.put("k", "v")))
    t.start()
    wait_for(lambda: all(n.calls.get("Put", 0) >= 2 for n in fc.nodes), what="client retrying on every member")
    fc.leader_id = 2
    t.join(10)
    return out


def test_no_leader_is_retried_until_one_is_elected():
    with FakeCluster(leader=None) as fc, Client(fc.endpoints, timeout=10, retry=FixedInterval(interval=0.02)) as c:
        out = put_while_no_leader_then_elect(fc, c)
        assert out and out[0].revision == 1
        assert fc.sm.data[b"k"].value == b"v"


def test_dead_leader_is_skipped_without_error():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, timeout=5) as c:
        c.put("a", "1")
        fc.stop(1)
        fc.leader_id = 2
        assert c.put("a", "2").revision == 2
        assert c.leader == fc.node(2).addr


def test_hung_member_costs_one_attempt_timeout():
    policy = ExponentialBackoff(attempt_timeout=0.3)
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, timeout=5, retry=policy) as c:
        c.put("a", "1")
        fc.node(1).hang = True  # like SIGSTOP: the connection stays open, nothing answers
        fc.leader_id = 2
        t0 = time.monotonic()
        assert c.get("a").value == b"1"
        assert 0.25 < time.monotonic() - t0 < 2.0


def test_redirects_to_a_silent_member_are_not_followed_while_it_is_penalized():
    """Followers keep naming a paused leader until the election ends; the client
    must not spend another attempt timeout on it meanwhile."""
    policy = FixedInterval(interval=0.01, attempt_timeout=0.5)
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, timeout=10, retry=policy, coalesce=False) as c:
        c.put("a", "1")
        fc.node(1).hang = True  # still named leader by the followers
        out: list = []
        t = threading.Thread(target=lambda: out.append(c.put("a", "2")))
        t.start()
        wait_for(lambda: fc.node(2).calls.get("Put", 0) >= 2 and fc.node(3).calls.get("Put", 0) >= 2,
                 what="client asking the followers")
        fc.leader_id = 2  # the election ends
        t.join(10)
        assert out and out[0].revision == 2
        assert fc.node(1).calls["Put"] == 2  # the first put, and the one attempt that hung


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_nothing_answered_lists_every_endpoint_and_why(transport):
    with FakeCluster() as fc:
        addrs = fc.endpoints
        for n in fc.nodes:
            fc.stop(n.member_id)
        with Client(addrs, retry=FixedInterval(interval=0.01, max_attempts=6), transport=transport) as c:
            with pytest.raises(errors.NoEndpointAnswered) as ei:
                c.put("k", "v")
    e = ei.value
    assert isinstance(e, errors.Unavailable) and isinstance(e, errors.KvstoreError)
    assert set(e.causes) == set(addrs)
    for a in addrs:
        assert a in str(e)
    assert all(why.startswith("UNAVAILABLE") for why in e.causes.values())
    # A refused unary call does not prove the write was not applied; a session stream
    # writes nothing until the member has answered its headers, so it does.
    assert e.maybe_applied == (transport == "unary")
    assert not isinstance(e.__cause__, grpc.RpcError)


def test_nothing_answered_within_the_deadline():
    with FakeCluster() as fc:
        addrs = fc.endpoints
        for n in fc.nodes:
            fc.stop(n.member_id)
        with Client(addrs, timeout=0.5) as c:
            with pytest.raises(errors.DeadlineExceeded) as ei:
                c.get("k", serializable=True)
    assert set(ei.value.causes) == set(addrs) and "deadline of 0.5s" in str(ei.value)


def test_retried_cas_whose_reply_was_lost_is_applied_once_and_the_first_result_returned():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, coalesce=False) as c:
        c.put("x", "0")
        fc.node(1).drop_replies = 1  # the server applies the txn, then the reply is lost
        cas = Txn().when(value("x") == "0").then(put("x", "1"))
        r = c.txn(cas)
        assert r.succeeded  # a second application would have failed the compare
        txns = [req for m, req in fc.node(1).requests if m == "Txn"]
        assert len(txns) == 2 and txns[0].request_id.seq == txns[1].request_id.seq
        rid = txns[0].request_id
        assert fc.sm.applied[(rid.client_id, rid.seq)] == 1
        assert fc.sm.data[b"x"].version == 2


def test_client_fault_hook_drops_a_reply_and_the_retry_gets_the_original():
    dropped = []

    def drop_first_txn(method, request):
        if method in ("Txn", "Batch") and not dropped:
            dropped.append(request.request_id.seq)
            return True
        return False

    with FakeCluster(leader=1) as fc:
        with Client(fc.endpoints, testing_drop_reply_after_send=drop_first_txn) as c:
            c.put("x", "0")
            r = c.txn(compare=[value("x") == "0"], success=[put("x", "1")], failure=[put("x", "fail")])
        assert r.succeeded and dropped
        assert fc.sm.data[b"x"].value == b"1"
        assert fc.node(1).calls["Txn"] == 2


def test_retries_of_a_coalesced_batch_resend_the_same_request_id():
    with FakeCluster(leader=1) as fc:
        fc.node(1).drop_replies = 1

        async def main():
            async with AsyncClient(fc.endpoints) as c:
                return await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(8)))

        res = asyncio.run(main())
        batches = [r for m, r in fc.node(1).requests if m == "Batch"]
    first, retry = (b.request_id for b in batches)
    assert len(batches) == 2 and (first.client_id, first.seq) == (retry.client_id, retry.seq)
    assert first.opens_session and not retry.opens_session  # the dropped reply's attempt may have applied
    assert sorted(r.revision for r in res) == list(range(1, 9))  # applied once: revisions 1..8


def test_serializable_reads_are_served_by_followers():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, balancer="round_robin", coalesce=False) as c:
        c.put("k", "v")
        for _ in range(9):
            assert c.get("k", serializable=True).value == b"v"
        assert [n.calls.get("Range", 0) for n in fc.nodes] == [3, 3, 3]


def test_serializable_read_skips_a_failed_member():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints, coalesce=False) as c:
        c.put("k", "v")
        fc.stop(2)
        for _ in range(6):
            assert c.get("k", serializable=True).value == b"v"


def test_status_members_and_transfer():
    with FakeCluster(leader=1) as fc, Client(fc.endpoints[1:]) as c:
        st = c.status()
        assert st.member_id in (1, 2, 3)
        st2 = c.status(fc.node(2).addr)
        assert st2.member_id == 2 and st2.role == "follower" and st2.leader_id == 1
        ms = c.members()
        assert [m.id for m in ms] == [1, 2, 3]
        assert set(c.endpoints) == set(fc.endpoints)  # learned member 1
        all_ = c.status_all()
        assert sorted(s.member_id for s in all_.values()) == [1, 2, 3]
        new = c.transfer_leader(3)
        assert new == 3 and fc.leader_id == 3
        assert c.leader == fc.node(3).addr


def test_sync_client_from_16_threads():
    with FakeCluster(leader=2) as fc, Client(fc.endpoints) as c:
        errors_seen: list[BaseException] = []

        def worker(t):
            try:
                for i in range(40):
                    c.put(f"t{t}/{i}", f"{t}:{i}")
                    assert c.get(f"t{t}/{i}").value == f"{t}:{i}".encode()
            except BaseException as e:
                errors_seen.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors_seen, errors_seen[:3]
        assert c.range("t", prefix=True, count_only=True).count == 16 * 40
        # Calls from different threads met on the client's loop and shared RPCs.
        assert c.async_client.coalescer.ops > c.async_client.coalescer.rpcs


def test_closed_client_refuses_calls():
    with FakeCluster() as fc:
        c = Client(fc.endpoints)
        c.put("k", "v")
        c.close()
        c.close()
        with pytest.raises(errors.ClientClosed):
            c.get("k")


def test_bytes_and_str_are_both_accepted():
    with FakeCluster() as fc, Client(fc.endpoints) as c:
        c.put(b"\xffbin", "text")
        c.put("text", b"\x00\x01")
        assert c.get("\u00ffbin".encode("latin-1")).value == b"text"
        assert c.get(b"text").value == b"\x00\x01"
        with pytest.raises(TypeError):
            c.put(1, "x")  # type: ignore[arg-type]


def test_debug_log_traces_failed_attempts_and_waits_but_not_first_try_successes(caplog):
    caplog.set_level("DEBUG", logger="kvstore.client")
    with FakeCluster(leader=None) as fc, Client(fc.endpoints, timeout=10, retry=FixedInterval(interval=0.02)) as c:
        out = put_while_no_leader_then_elect(fc, c)
        assert out
        lines = [r.getMessage() for r in caplog.records if r.name == "kvstore.client"]
        assert any(f"Put to {fc.node(1).addr} failed: UNAVAILABLE: no leader" in m for m in lines)
        assert any("every endpoint failed since the last wait; waiting 20 ms" in m for m in lines)
        assert lines[-1].startswith(f"Put answered by {fc.node(2).addr} at attempt ")
        caplog.clear()
        c.put("k", "w")  # straight to the cached leader: nothing to trace
        assert not [r for r in caplog.records if r.name == "kvstore.client"]
