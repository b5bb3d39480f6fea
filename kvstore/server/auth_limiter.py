"""Failed authentications, limited per user name and per client address.

A password guesser gets ``max_failures`` wrong guesses per user and per address
within ``window_s``; after that every attempt from that address or for that
user is refused at once (without running the KDF) until the oldest failure
leaves the window. Each failure is logged with the user and the address.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable

__all__ = ["FailureLimiter"]


class FailureLimiter:
    def __init__(self, max_failures: int = 5, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str, now: float) -> collections.deque[float] | None:
        q = self._failures.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._failures[key]
            return None
        return q

    def blocked(self, user: str, addr: str) -> tuple[str, float] | None:
        """(what is blocked, seconds until the next attempt may run), or None if both may try."""
        now = self._clock()
        for what, key in ((f"user {user!r}", "u:" + user), (f"address {addr}", "a:" + addr)):
            q = self._recent(key, now)
            if q is not None and len(q) >= self.max_failures:
                return what, q[0] + self.window_s - now
        return None

    def failed(self, user: str, addr: str) -> None:
        now = self._clock()
        for key in ("u:" + user, "a:" + addr):
            self._failures.setdefault(key, collections.deque()).append(now)
        if len(self._failures) > 100_000:  # a flood of names: forget the quiet ones
            for key in list(self._failures):
                self._recent(key, now)
