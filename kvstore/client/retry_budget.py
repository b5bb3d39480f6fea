"""A retry budget: retries may add at most a fraction of the client's requests, plus a small floor.

Backoff spaces one call's retries; it does nothing about how many calls retry
at once. When a whole cluster struggles, every caller retrying multiplies the
load exactly when it can least take it. The budget (Finagle's RetryBudget;
gRPC's retry throttling is the same idea) is a token bucket: every request
started deposits ``ratio`` of a retry, the floor adds ``min_per_second``
retries per second so a client that makes few calls can still retry them, the
balance never exceeds ``min_per_second * window`` (the reserve a fresh client
starts with), and every retry withdraws one. Following a redirect to the
named leader is not a retry: it is how a call reaches the leader.

When the budget is spent, a failing call does not retry: it waits (its
backoff, again and again) until the budget allows or its deadline passes, so
callers still fail only at their deadline while the cluster sees at most the
budgeted rate. The floor keeps a trickle of retries going, so one of them
finds the new leader after an election; a call that learns the leader from
another call goes there at once: that is a redirect, not a retry.
"""
from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RetryBudget"]


class RetryBudget:
    """Retries allowed: ``ratio`` per request started plus ``min_per_second``, banked up to a reserve."""

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0:
            raise ValueError("need ratio >= 0, min_per_second >= 0, window > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.reserve = max(min_per_second * window, 1.0 if ratio > 0 else 0.0)
        self._clock = clock
        self._balance = min_per_second * window
        self._at = clock()
        self.total_requests = 0
        self.total_retries = 0
        self.refused = 0

    def _refill(self) -> float:
        now = self._clock()
        b = min(self.reserve, self._balance + (now - self._at) * self.min_per_second)
        self._at = now
        self._balance = b
        return b

    def request(self) -> None:
        """A new call started (its first attempt)."""
        self.total_requests += 1
        self._balance = min(self.reserve, self._balance + self.ratio)

    @property
    def balance(self) -> float:
        """Retries allowed right now (fractional)."""
        return self._refill()

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        if self._refill() < 1.0:
            self.refused += 1
            return False
        self._balance -= 1.0
        self.total_retries += 1
        return True
