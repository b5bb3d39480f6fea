"""A retry budget: retries may add at most a fraction of the client's recent requests.

Backoff spaces one call's retries; it does nothing about how many calls retry
at once. When a whole cluster struggles, every caller retrying multiplies the
load exactly when it can least take it. The budget (Finagle's RetryBudget,
gRPC's retry throttling) caps retries over a sliding window at ``ratio`` of the
requests started in that window plus a small floor (``min_per_second``), so a
client that makes few calls can still retry them. Following a redirect to the
named leader is not a retry: it is how a call reaches the leader.

When the budget is spent, a failing call gives up at once with the failures it
has seen (``RetryBudgetExhausted``) instead of adding to the storm.
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["RetryBudget"]


class RetryBudget:
    """Counts requests and retries in one-second buckets over the last ``window`` seconds."""

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window < 1:
            raise ValueError("need ratio >= 0, min_per_second >= 0, window >= 1 s")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._clock = clock
        n = int(window)
        self._requests = [0] * n
        self._retries = [0] * n
        self._second = int(clock())  # the second the newest bucket counts
        self.total_requests = 0
        self.total_retries = 0
        self.refused = 0

    def _roll(self) -> int:
        now = int(self._clock())
        n = len(self._requests)
        if now != self._second:
            for s in range(max(self._second + 1, now - n + 1), now + 1):
                self._requests[s % n] = 0
                self._retries[s % n] = 0
            self._second = now
        return now % n

    def request(self) -> None:
        """A new call started (its first attempt)."""
        self._requests[self._roll()] += 1
        self.total_requests += 1

    def allowed(self) -> float:
        """Retries the window allows in all."""
        self._roll()
        return self.ratio * sum(self._requests) + self.min_per_second * self.window

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        i = self._roll()
        if sum(self._retries) + 1 > self.ratio * sum(self._requests) + self.min_per_second * self.window:
            self.refused += 1
            return False
        self._retries[i] += 1
        self.total_retries += 1
        return True

    def retries_in_window(self) -> int:
        self._roll()
        return sum(self._retries)
