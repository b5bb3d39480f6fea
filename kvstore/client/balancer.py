"""Load balancing of serializable reads over the members.

Serializable reads may be served by any member, so spreading them adds read
capacity. Linearizable reads and writes always go to the leader and never pass
through a balancer. A balancer picks one endpoint from the candidates it is
given (the client removes the ones that already failed this call) and is told
when each request it routed starts and ends.
"""
from __future__ import annotations

import asyncio
import random
from typing import Protocol
from collections.abc import Callable, Mapping, Sequence

__all__ = ["Balancer", "RoundRobin", "RandomChoice", "LeastOutstanding", "Weighted", "make_balancer"]


class Balancer(Protocol):
    def pick(self, candidates: Sequence[str]) -> str: ...

    def started(self, endpoint: str) -> None: ...

    def finished(self, endpoint: str) -> None: ...


class _NoTracking:
    def started(self, endpoint: str) -> None:
        pass

    def finished(self, endpoint: str) -> None:
        pass


class RoundRobin(_NoTracking):
    """Each endpoint in turn, one turn per event-loop turn.

    The calls made in the same loop turn (callers woken together by one
    answer message) go to the same member, so they travel in one session
    stream message, as a coalesced batch would; spread call by call over
    every member's streams they would cost a message each. Outside an event
    loop, each call is a turn.
    """

    def __init__(self) -> None:
        self._i = 0
        self._held = False  # the turn ends when the loop turn does

    def pick(self, candidates: Sequence[str]) -> str:
        i = self._i
        if not self._held:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._i = i + 1
                return candidates[i % len(candidates)]
            self._held = True
            loop.call_soon(self._next_turn)
        return candidates[i % len(candidates)]

    def _next_turn(self) -> None:
        self._i += 1
        self._held = False


class RandomChoice(_NoTracking):
    """A uniformly random endpoint (stateless; no coordination between clients needed)."""

    def __init__(self, rng: Callable[[int], int] | None = None) -> None:
        self._randbelow = rng or random.Random().randrange

    def pick(self, candidates: Sequence[str]) -> str:
        return candidates[self._randbelow(len(candidates))]


class LeastOutstanding:
    """The endpoint with the fewest requests in flight from this client.

    A slow or overloaded member accumulates outstanding requests and so
    receives fewer new ones. Ties rotate so idle members share the load.
    """

    def __init__(self) -> None:
        self._outstanding: dict[str, int] = {}
        self._tie = 0

    def pick(self, candidates: Sequence[str]) -> str:
        get = self._outstanding.get
        n = len(candidates)
        self._tie += 1
        best = candidates[self._tie % n]
        best_load = get(best, 0)
        for k in range(1, n):
            ep = candidates[(self._tie + k) % n]
            load = get(ep, 0)
            if load < best_load:
                best, best_load = ep, load
        return best

    def started(self, endpoint: str) -> None:
        self._outstanding[endpoint] = self._outstanding.get(endpoint, 0) + 1

    def finished(self, endpoint: str) -> None:
        self._outstanding[endpoint] = max(0, self._outstanding.get(endpoint, 0) - 1)

    def outstanding(self, endpoint: str) -> int:
        return self._outstanding.get(endpoint, 0)


class Weighted(_NoTracking):
    """Endpoints in proportion to their weights (smooth weighted round-robin).

    The nginx algorithm: exact proportions over every window of
    ``sum(weights)`` picks, interleaved rather than in runs. An endpoint with
    no weight gets ``default_weight``; weight 0 excludes it unless it is the
    only candidate left.
    """

    def __init__(self, weights: Mapping[str, int], default_weight: int = 1) -> None:
        if any(w < 0 for w in weights.values()) or default_weight < 0:
            raise ValueError("weights must be >= 0")
        self._weights = dict(weights)
        self._default = default_weight
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[str]) -> str:
        total = 0
        best: str | None = None
        best_cur = 0
        cur = self._current
        for ep in candidates:
            w = self._weights.get(ep, self._default)
            if w == 0:
                continue
            c = cur.get(ep, 0) + w
            cur[ep] = c
            total += w
            if best is None or c > best_cur:
                best, best_cur = ep, c
        if best is None:
            return candidates[0]
        cur[best] = best_cur - total
        return best


def make_balancer(spec: str | Balancer | None) -> Balancer:
    """A balancer from a name ("round_robin", "random", "least_outstanding") or an instance."""
    if spec is None or spec == "round_robin":
        return RoundRobin()
    if spec == "random":
        return RandomChoice()
    if spec == "least_outstanding":
        return LeastOutstanding()
    if isinstance(spec, str):
        raise ValueError(f"unknown balancer {spec!r} (round_robin, random, least_outstanding, or a Weighted(...))")
    return spec
