"""Retry policies: waits, jitter bounds, caps, deadlines and retryable codes."""
from __future__ import annotations

import random
import time

import grpc
import pytest

from client_fake_cluster import Fault, FakeCluster
from kvstore.client import Client, errors
from kvstore.client.retry import DEFAULT_RETRYABLE, ExponentialBackoff, FixedInterval, NoRetry


def test_fixed_interval_waits_the_same_every_time():
    p = FixedInterval(interval=0.2)
    assert [p.backoff(n) for n in range(5)] == [0.2] * 5
    with pytest.raises(ValueError):
        FixedInterval(interval=-1)


def test_exponential_without_jitter_doubles_up_to_the_cap():
    p = ExponentialBackoff(base=0.01, cap=0.1, jitter=False)
    assert [round(p.backoff(n), 6) for n in range(6)] == [0.01, 0.02, 0.04, 0.08, 0.1, 0.1]
    assert p.backoff(10_000) == 0.1  # no overflow for huge attempt numbers


def test_full_jitter_stays_within_zero_and_the_ceiling():
    rng = random.Random(7)
    p = ExponentialBackoff(base=0.01, cap=0.5, rng=rng.random)
    for n in range(12):
        top = p.ceiling(n)
        waits = [p.backoff(n) for _ in range(500)]
        assert all(0 <= w <= top for w in waits)
        # Full jitter is uniform on [0, top]: the mean sits near top/2 and the
        # samples reach both ends of the interval.
        assert abs(sum(waits) / len(waits) - top / 2) < top * 0.08
        assert min(waits) < top * 0.05 and max(waits) > top * 0.95


def test_jitter_extremes_with_a_stub_rng():
    assert ExponentialBackoff(base=0.1, cap=1.0, rng=lambda: 0.0).backoff(3) == 0.0
    assert ExponentialBackoff(base=0.1, cap=1.0, rng=lambda: 0.999999).backoff(3) == pytest.approx(0.8, rel=1e-5)
    assert ExponentialBackoff(base=0.1, cap=1.0, rng=lambda: 0.999999).backoff(9) == pytest.approx(1.0, rel=1e-5)


def test_retryable_set_is_explicit():
    p = FixedInterval()
    assert p.is_retryable(grpc.StatusCode.UNAVAILABLE)
    assert not p.is_retryable(grpc.StatusCode.INVALID_ARGUMENT)
    only = FixedInterval(retryable=frozenset({grpc.StatusCode.ABORTED}))
    assert not only.is_retryable(grpc.StatusCode.UNAVAILABLE)
    assert grpc.StatusCode.DEADLINE_EXCEEDED in DEFAULT_RETRYABLE


def test_total_deadline_bounds_the_call_and_reports_attempts_per_endpoint():
    # Every member answers "no leader". Rounds of attempts at 0, 0.25 and 0.5 s: the deadline falls in a
    # pause, so no attempt is cut short in flight (that one's outcome would rightly be unknown).
    with FakeCluster(leader=None) as fc:
        with Client(fc.endpoints, timeout=0.6, retry=FixedInterval(interval=0.25)) as c:
            t0 = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded) as ei:
                c.put("k", "v")
            took = time.monotonic() - t0
    e = ei.value
    assert 0.55 <= took < 2.0
    assert e.attempts >= 6
    assert set(e.causes) == set(fc.endpoints)
    assert all("no leader" in why for why in e.causes.values()), e.causes
    assert not e.maybe_applied  # every answer carried kvstore-not-applied
    assert f"{e.attempts} attempt" in str(e) and fc.endpoints[0] in str(e)


def test_max_attempts_gives_up_with_the_nothing_answered_error():
    with FakeCluster() as fc:
        for n in fc.nodes:
            n.faults = [Fault(grpc.StatusCode.UNAVAILABLE, "disk on fire")] * 10
        with Client(fc.endpoints, retry=FixedInterval(interval=0.0, max_attempts=3)) as c:
            with pytest.raises(errors.NoEndpointAnswered) as ei:
                c.get("k")
    assert ei.value.attempts == 3
    assert all("disk on fire" in why for why in ei.value.causes.values())


def test_non_retryable_status_is_raised_at_once_as_its_type():
    with FakeCluster() as fc:
        fc.node(1).faults = [Fault(grpc.StatusCode.INVALID_ARGUMENT, "key too large: 2000000 > max_key_bytes 1536")]
        with Client(fc.endpoints, coalesce=False) as c:
            with pytest.raises(errors.InvalidArgument, match="max_key_bytes"):
                c.put("k", "v")
        assert fc.total_calls("Put") == 1


def test_a_call_cancelled_by_a_stopping_member_is_retried_with_the_same_request_id():
    with FakeCluster() as fc:
        fc.node(1).faults = [Fault(grpc.StatusCode.CANCELLED, "server shutting down")]
        with Client(fc.endpoints, coalesce=False, retry=FixedInterval(interval=0.01, deadline=10)) as c:
            c.put("k", "v")
        puts = [r for n in fc.nodes for m, r in n.requests if m == "Put"]
        assert len(puts) >= 2  # the cancelled one, then the retry (through redirects) that applied
        assert len({(p.request_id.client_id, p.request_id.seq) for p in puts}) == 1  # deduplicated if the first had applied
        assert puts[0].request_id.opens_session and not puts[-1].request_id.opens_session  # the first may have applied


def test_no_retry_makes_one_attempt():
    with FakeCluster() as fc:
        fc.node(1).faults = [Fault(grpc.StatusCode.UNAVAILABLE, "blip")]
        with Client(fc.endpoints[:1], retry=NoRetry()) as c:
            with pytest.raises(errors.NoEndpointAnswered):
                c.put("k", "v")
