"""The client over session streams against the fault-injecting fake cluster: redirects mid-stream,
a member lost with requests in flight, the circuit breaker and the retry budget."""
from __future__ import annotations

import asyncio
import time

import pytest

from client_fake_cluster import FakeCluster
from kvstore.client import AsyncClient, Client, errors
from kvstore.client.breaker import CircuitBreaker
from kvstore.client.retry import ExponentialBackoff, FixedInterval
from kvstore.client.retry_budget import RetryBudget

pytestmark = pytest.mark.timeout(60)


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_calls_ride_the_members_streams_in_turn_and_unary_stays_available():
    with FakeCluster() as fc:
        with Client(fc.endpoints, coalesce=False, streams_per_member=4) as c:
            for i in range(20):
                c.put(f"k{i}", "v")
            assert c.get("k3").value == b"v"
        n = fc.node(1)
        assert n.streams_opened == 4 and sorted(s.received for s in n.session_streams) == [5, 5, 5, 6]
        assert n.calls["Put"] == 20
        with Client(fc.endpoints, coalesce=False, transport="unary") as c:
            c.put("u", "v")
        assert n.streams_opened == 4 and n.calls["Put"] == 21
    with pytest.raises(ValueError, match="transport must be one of stream, unary"):
        AsyncClient(["127.0.0.1:1"], transport="udp")


def test_a_coalesced_batch_is_one_stream_message():
    with FakeCluster() as fc:
        async def main() -> None:
            async with AsyncClient(fc.endpoints, streams_per_member=1) as c:
                await c.put("warm", "x")
                await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(100)))

        asyncio.run(main())
        assert fc.node(1).calls.get("Batch") == 1
        assert fc.node(1).session_streams[0].received == 2


def test_calls_made_in_one_loop_turn_share_a_stream_and_members_still_take_turns():
    """Callers woken together go to one member's one stream (so their requests can share a message), and
    the turn moves on with the loop turn: spread call by call over 3 members x 4 streams, 256 callers
    with one op each packed 1.6 requests per message, and read 3.6 times slower."""
    with FakeCluster(leader=1) as fc:
        async def main() -> None:
            async with AsyncClient(fc.endpoints, coalesce=False, streams_per_member=4) as c:
                await c.put("k", "v")
                for _ in range(6):  # six loop turns, 30 reads each
                    await asyncio.gather(*(c.get("k", serializable=True) for _ in range(30)))
                await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(20)))

        asyncio.run(main())
        reads = sorted(n.calls.get("Range", 0) for n in fc.nodes)
        assert reads == [60, 60, 60], reads  # every member in turn, 30 at a time
        for n in fc.nodes:
            assert all(s.received % 30 == 0 for s in n.session_streams if n.member_id != 1)
        assert max(s.received for s in fc.node(1).session_streams) >= 20  # the 20 puts: one stream


def test_redirect_mid_stream_moves_the_requests_in_flight_to_the_new_leader():
    with FakeCluster(leader=1) as fc:
        async def main() -> list:
            async with AsyncClient(fc.endpoints, coalesce=False, timeout=10) as c:
                await c.put("warm", "x")
                fc.node(1).delay = 0.3  # requests now sit on member 1's stream a while ...
                calls = [asyncio.ensure_future(c.put(f"k{i}", str(i))) for i in range(50)]
                await asyncio.sleep(0.1)
                fc.leader_id = 2  # ... and it loses leadership under them: each is redirected
                out = await asyncio.gather(*calls)
                assert c.leader == fc.node(2).addr
                return out

        results = asyncio.run(main())
        assert len(results) == 50
        sm = fc.sm
        assert all(sm.data[f"k{i}".encode()].value == str(i).encode() for i in range(50))
        assert all(n == 1 for n in sm.applied.values())  # every write applied once
        assert fc.node(2).session_streams and fc.node(2).calls["Put"] == 50


def test_a_member_lost_with_writes_in_flight_applies_each_once_and_the_callers_get_the_first_answers():
    with FakeCluster(leader=1) as fc:
        async def main() -> list:
            async with AsyncClient(fc.endpoints, coalesce=False, timeout=10,
                                   retry=ExponentialBackoff(jitter=False)) as c:
                await c.put("warm", "x")
                fc.node(1).hang_after_apply = True  # applied, never answered
                calls = [asyncio.ensure_future(c.put(f"k{i}", str(i))) for i in range(30)]
                await asyncio.to_thread(wait_for, lambda: len(fc.sm.applied) == 31, 10, "30 writes applied")
                fc.leader_id = 2
                fc.stop(1)  # the stream breaks with all 30 in flight
                return await asyncio.gather(*calls)

        results = asyncio.run(main())
        sm = fc.sm
        assert len(sm.applied) == 31 and all(n == 1 for n in sm.applied.values())
        revisions = sorted(r.revision for r in results)
        assert revisions == list(range(2, 32))  # the original answers, not new writes
        assert fc.node(2).calls["Put"] == 30  # every one retried with its RequestId


def test_a_broken_stream_reports_outcome_unknown_when_no_retry_is_left():
    with FakeCluster(leader=1) as fc:
        fc.node(1).hang_after_apply = True

        async def main() -> None:
            async with AsyncClient([fc.node(1).addr], coalesce=False, timeout=1.5,
                                   retry=FixedInterval(interval=0.05)) as c:
                await c.get("warm")  # the stream is open
                call = asyncio.ensure_future(c.put("k", "v"))
                await asyncio.to_thread(wait_for, lambda: len(fc.sm.applied) == 1, 10, "the put applied")
                await asyncio.to_thread(fc.stop, 1)  # the stream breaks with the put unanswered
                with pytest.raises(errors.DeadlineExceeded) as ei:
                    await call
                assert ei.value.maybe_applied  # never "not applied": it was
                assert "outcome unknown" in str(ei.value) or "refused" in str(ei.value)

        asyncio.run(main())


def refused_attempts(n_callers: int, secs: float, breaker: CircuitBreaker | None) -> int:
    """Attempts ``n_callers`` concurrent puts make against one endpoint that refuses connections."""
    with FakeCluster(n=1) as fc:
        fc.stop(1)

        async def main() -> int:
            async with AsyncClient(fc.endpoints, coalesce=False, timeout=secs, breaker=breaker) as c:
                out = await asyncio.gather(*(c.put("k", "v") for _ in range(n_callers)), return_exceptions=True)
            assert all(isinstance(e, errors.DeadlineExceeded) for e in out)
            return sum(e.attempts for e in out)  # type: ignore[union-attr]

        return asyncio.run(main())


def test_the_breaker_spaces_attempts_against_a_refusing_member():
    # Without it, the default backoff (capped at 0.1 s) makes ~40 attempts in 2 s.
    assert refused_attempts(1, 2.0, None) <= 8


def test_many_callers_against_a_refusing_member_make_one_probe_per_interval():
    # 50 callers each sending at once (50 attempts), then one probe per open interval.
    assert refused_attempts(50, 2.0, None) <= 50 + 10


def test_a_member_back_from_refusing_is_used_again_after_one_probe():
    with FakeCluster(n=1) as fc:
        addr = fc.node(1).addr
        fc.stop(1)

        async def main() -> None:
            async with AsyncClient([addr], coalesce=False, timeout=0.3) as c:
                with pytest.raises(errors.DeadlineExceeded):
                    await c.put("k", "v")
                assert c._endpoints.breaker.failures(addr) > 0
                await asyncio.to_thread(fc.start, 1)
                t0 = time.monotonic()
                await c.put("k", "v", timeout=3.0)  # waits out the open interval, probes, succeeds
                assert time.monotonic() - t0 < 2.5
                assert not c._endpoints.breaker.is_open(addr) and c._endpoints.breaker.failures(addr) == 0

        asyncio.run(main())


def test_no_leader_answers_never_open_the_circuit():
    with FakeCluster(leader=None) as fc:
        with Client(fc.endpoints, timeout=0.5, retry=FixedInterval(interval=0.02)) as c:
            with pytest.raises(errors.DeadlineExceeded):
                c.put("k", "v")
            assert not any(c.async_client._endpoints.breaker.is_open(a) for a in fc.endpoints)


def test_the_retry_budget_holds_retries_back_until_the_deadline():
    with FakeCluster(leader=None) as fc:  # every attempt fails "no leader": only the budget stops it
        budget = RetryBudget(ratio=0.0, min_per_second=0.3, window=10.0)  # 3 retries per 10 s
        with Client(fc.endpoints, timeout=1.0, retry=FixedInterval(interval=0.01), retry_budget=budget) as c:
            with pytest.raises(errors.DeadlineExceeded) as ei:
                c.put("k", "v")
        assert ei.value.attempts == 4  # the first attempt and the 3 retries the budget had (not ~100)
        assert "retry budget" in ei.value.causes
        assert fc.total_calls("Put") == 4 and budget.refused > 0


def test_a_call_held_back_by_the_budget_goes_to_a_leader_another_call_found():
    with FakeCluster(leader=None) as fc:
        budget = RetryBudget(ratio=0.0, min_per_second=0.0, window=10.0)  # no retries at all

        async def main() -> None:
            async with AsyncClient([fc.node(2).addr], coalesce=False, timeout=5.0,
                                   retry=FixedInterval(interval=0.02), retry_budget=budget) as c:
                waiting = asyncio.ensure_future(c.put("k", "v"))
                await asyncio.sleep(0.2)
                assert not waiting.done()  # "no leader", and no retry allowed
                fc.leader_id = 1
                c._endpoints.set_leader(fc.node(1).addr)  # as when another call is redirected there
                await asyncio.wait_for(waiting, 2.0)

        asyncio.run(main())
        assert fc.node(1).calls["Put"] == 1 and budget.total_retries == 0


def test_following_a_redirect_is_not_a_retry():
    with FakeCluster(leader=1) as fc:
        budget = RetryBudget(ratio=0.0, min_per_second=0.0, window=1.0)  # no retries at all
        with Client([fc.node(3).addr, fc.node(1).addr], timeout=5.0, retry_budget=budget) as c:
            c.put("k", "v")  # member 3 redirects to member 1
            assert c.leader == fc.node(1).addr
        assert budget.total_retries == 0 and budget.refused == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("member_keepalive", [True, False], ids=["members-keepalive", "grpc-default"])
def test_an_idle_session_stream_survives_the_clients_keepalive_pings_only_with_the_members_policy(
    member_keepalive,
):
    with FakeCluster(member_keepalive=member_keepalive) as fc:
        async def main() -> bool:
            async with AsyncClient(fc.endpoints, coalesce=False, streams_per_member=1) as c:
                await c.put("a", "1")
                stream = c._endpoints.conn(fc.node(1).addr).stream()  # the one the put used
                await asyncio.sleep(100)  # ten keepalive pings without data
                return not stream.broken

        # gRPC's default policy ends the idle stream with GOAWAY "too_many_pings" (what the
        # members' KEEPALIVE_SERVER_OPTIONS prevent); with them it stays open.
        assert asyncio.run(main()) is member_keepalive
