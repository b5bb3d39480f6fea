"""A circuit breaker per endpoint: stop hammering a member that refuses or stays silent.

Without it a client retries a refusing member as fast as its backoff allows
(98 attempts in 5 s from one CLI call; 1,000 clients make 20k retries/s
against a recovering cluster). A member whose attempt fails at the connection
level (refused, reset, the stream broke, or silent for a whole attempt) is
*open*: calls skip it for an interval that doubles with each consecutive
failure (``base`` to ``cap``, with jitter so many clients do not return in
lockstep). When the interval ends it is *half-open*: the next call is let
through as the one probe, while the others keep skipping it; the probe's
success closes the circuit, its failure opens it again for twice as long.

A member that answers, even with an error ("no leader", a redirect, a bad
request), is alive and never trips the breaker.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterable

__all__ = ["CircuitBreaker"]


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    open_until: float = 0.0  # time.monotonic() when it turns half-open
    probe_until: float = 0.0  # a probe is out until then (others keep skipping)


class CircuitBreaker:
    """Per-endpoint open / half-open / closed state. Only used from the client's event loop."""

    def __init__(
        self,
        *,
        base: float = 0.1,
        cap: float = 2.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base or multiplier < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < base <= cap, multiplier >= 1, 0 <= jitter < 1")
        self.base = base
        self.cap = cap
        self.multiplier = multiplier
        self.jitter = jitter
        self._clock = clock
        self._rng = rng
        self._circuits: dict[str, _Circuit] = {}

    def is_open(self, addr: str) -> bool:
        """True while calls should skip ``addr`` (open, or half-open with its probe out)."""
        c = self._circuits.get(addr)
        if c is None:
            return False
        now = self._clock()
        return now < c.open_until or now < c.probe_until

    def allow(self, addr: str) -> bool:
        """May a call try ``addr`` now? In half-open state the first caller becomes the probe."""
        c = self._circuits.get(addr)
        if c is None:
            return True
        now = self._clock()
        if now < c.open_until or now < c.probe_until:
            return False
        # Half-open: this call is the probe. Until its outcome is known (or for one
        # interval, if it never reports), everyone else keeps skipping the member.
        c.probe_until = now + self._interval(c.failures)
        return True

    def success(self, addr: str) -> None:
        if self._circuits:
            self._circuits.pop(addr, None)

    def failure(self, addr: str, at_least: float = 0.0) -> float:
        """A connection-level failure: open (again) for the next interval, or ``at_least``; returns it."""
        c = self._circuits.get(addr)
        if c is None:
            c = self._circuits[addr] = _Circuit()
        c.failures += 1
        interval = max(self._interval(c.failures), at_least)
        c.open_until = self._clock() + interval
        c.probe_until = 0.0
        return interval

    def failures(self, addr: str) -> int:
        c = self._circuits.get(addr)
        return c.failures if c is not None else 0

    def wait(self, addrs: Iterable[str]) -> float:
        """Seconds until the first of ``addrs`` may be tried again (0 if one may now)."""
        now = self._clock()
        best = None
        for a in addrs:
            c = self._circuits.get(a)
            if c is None:
                return 0.0
            w = max(c.open_until, c.probe_until) - now
            if w <= 0:
                return 0.0
            best = w if best is None else min(best, w)
        return best or 0.0

    def _interval(self, failures: int) -> float:
        top = min(self.cap, self.base * self.multiplier ** min(max(failures - 1, 0), 64))
        return top * (1 - self.jitter + 2 * self.jitter * self._rng())
