"""The circuit breaker's and the retry budget's arithmetic, on a hand-driven clock."""
from __future__ import annotations

import pytest

from kvstore.client.breaker import CircuitBreaker
from kvstore.client.retry_budget import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_open_circuit_doubles_its_interval_up_to_the_cap_then_lets_one_probe_through():
    clock = Clock()
    b = CircuitBreaker(base=0.1, cap=0.5, jitter=0.0, clock=clock)
    assert b.allow("a") and not b.is_open("a")
    intervals = [b.failure("a") for _ in range(5)]
    assert intervals == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert b.is_open("a") and not b.allow("a")
    clock.t += 0.5  # half-open
    assert b.allow("a")  # the probe
    assert not b.allow("a") and b.is_open("a")  # everyone else still skips it
    b.failure("a")  # the probe failed: open again
    assert b.failures("a") == 6 and not b.allow("a")
    clock.t += 0.5
    assert b.allow("a")
    b.success("a")  # the probe answered: closed
    assert b.failures("a") == 0 and b.allow("a") and b.allow("a")


def test_a_silent_member_stays_open_at_least_as_long_as_asked_and_wait_names_the_first_due():
    clock = Clock()
    b = CircuitBreaker(base=0.1, cap=2.0, jitter=0.0, clock=clock)
    assert b.failure("a", at_least=2.0) == 2.0
    b.failure("b")
    assert b.wait(["a", "b"]) == pytest.approx(0.1)
    assert b.wait(["a", "b", "c"]) == 0.0  # c is closed
    clock.t += 0.1
    assert b.wait(["a", "b"]) == 0.0


def test_jitter_spreads_intervals_within_its_bounds():
    rolls = iter([0.0, 1.0])
    b = CircuitBreaker(base=1.0, cap=1.0, jitter=0.2, clock=Clock(), rng=lambda: next(rolls))
    assert b.failure("a") == pytest.approx(0.8)
    assert b.failure("b") == pytest.approx(1.2)


def test_the_budget_allows_its_reserve_then_a_fraction_of_requests_plus_the_floor():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0, clock=clock)
    assert sum(budget.try_retry() for _ in range(50)) == 10  # the reserve: 1/s over 10 s
    for _ in range(100):
        budget.request()
    assert sum(budget.try_retry() for _ in range(50)) == 10  # 20% of 100 requests
    clock.t += 3.0
    assert sum(budget.try_retry() for _ in range(50)) == 3  # the floor: 1 per second
    assert budget.refused == 40 + 40 + 47 and budget.total_retries == 23


def test_the_budget_never_banks_more_than_its_reserve():
    clock = Clock()
    budget = RetryBudget(ratio=0.5, min_per_second=2.0, window=1.0, clock=clock)
    for _ in range(1000):
        budget.request()
    clock.t += 100.0
    assert budget.balance == 2.0
    assert sum(budget.try_retry() for _ in range(10)) == 2
