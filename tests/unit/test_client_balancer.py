"""Each read balancer spreads picks the way it promises."""
from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from kvstore.client.balancer import LeastOutstanding, RandomChoice, RoundRobin, Weighted, make_balancer

EPS = ["a:1", "b:1", "c:1"]


def test_round_robin_is_exactly_even_and_in_turn():
    b = RoundRobin()
    picks = [b.pick(EPS) for _ in range(300)]
    assert picks[:4] == ["a:1", "b:1", "c:1", "a:1"]
    assert Counter(picks) == {"a:1": 100, "b:1": 100, "c:1": 100}


def test_round_robin_in_an_event_loop_turns_once_per_loop_turn():
    """Calls made in one loop turn go to one member (their requests then share a stream message)."""
    async def main() -> list[list[str]]:
        b = RoundRobin()
        turns = []
        for _ in range(6):
            turns.append([b.pick(EPS) for _ in range(10)])
            await asyncio.sleep(0)
        return turns

    turns = asyncio.run(main())
    assert [set(t) for t in turns] == [{"a:1"}, {"b:1"}, {"c:1"}, {"a:1"}, {"b:1"}, {"c:1"}]


def test_random_is_roughly_uniform():
    b = RandomChoice(random.Random(42).randrange)
    counts = Counter(b.pick(EPS) for _ in range(30_000))
    # Chi-square with 2 degrees of freedom; 13.8 is the 0.1% critical value.
    chi2 = sum((c - 10_000) ** 2 / 10_000 for c in counts.values())
    assert chi2 < 13.8, counts


def test_least_outstanding_prefers_the_idle_member():
    b = LeastOutstanding()
    for _ in range(5):
        b.started("a:1")
    for _ in range(2):
        b.started("b:1")
    assert b.pick(EPS) == "c:1"
    b.started("c:1")
    b.started("c:1")
    b.started("c:1")
    assert b.pick(EPS) == "b:1"  # a:5, b:2, c:3
    for _ in range(5):
        b.finished("a:1")
    assert b.pick(EPS) == "a:1"


def test_least_outstanding_spreads_evenly_when_requests_pile_up():
    b = LeastOutstanding()
    counts = Counter()
    for _ in range(300):  # nothing finishes: each pick raises that member's load
        ep = b.pick(EPS)
        b.started(ep)
        counts[ep] += 1
    assert counts == {"a:1": 100, "b:1": 100, "c:1": 100}


def test_least_outstanding_rotates_ties_when_idle():
    b = LeastOutstanding()
    picks = Counter()
    for _ in range(300):
        ep = b.pick(EPS)
        b.started(ep)
        b.finished(ep)
        picks[ep] += 1
    assert picks == {"a:1": 100, "b:1": 100, "c:1": 100}


def test_weighted_gives_exact_proportions_interleaved():
    b = Weighted({"a:1": 5, "b:1": 1, "c:1": 1})
    picks = [b.pick(EPS) for _ in range(700)]
    assert Counter(picks) == {"a:1": 500, "b:1": 100, "c:1": 100}
    window = picks[:7]
    assert Counter(window) == {"a:1": 5, "b:1": 1, "c:1": 1}
    assert window != ["a:1"] * 5 + ["b:1", "c:1"]  # smooth: not a run of five


def test_weighted_zero_excludes_and_missing_uses_default():
    b = Weighted({"a:1": 0, "b:1": 3}, default_weight=1)
    counts = Counter(b.pick(EPS) for _ in range(400))
    assert counts == {"b:1": 300, "c:1": 100}
    assert Weighted({"a:1": 0}).pick(["a:1"]) == "a:1"  # the only one left still serves
    with pytest.raises(ValueError):
        Weighted({"a:1": -1})


def test_make_balancer_by_name():
    assert isinstance(make_balancer(None), RoundRobin)
    assert isinstance(make_balancer("random"), RandomChoice)
    assert isinstance(make_balancer("least_outstanding"), LeastOutstanding)
    w = Weighted({})
    assert make_balancer(w) is w
    with pytest.raises(ValueError):
        make_balancer("fastest")
