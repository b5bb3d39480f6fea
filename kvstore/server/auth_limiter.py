"""Failed authentications, limited per user name and per client address.

A password guesser gets ``max_user_failures`` wrong guesses per user name and
``max_addr_failures`` per client address (an address may host many users)
within ``window_s``; after that every attempt for that user or from that
address is refused at once (without running the KDF) until the oldest failure
leaves the window. The service logs each failure with the user and address.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable

__all__ = ["FailureLimiter"]


class FailureLimiter:
    def __init__(self, max_user_failures: int = 5, max_addr_failures: int = 20, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_user_failures = max_user_failures
        self.max_addr_failures = max_addr_failures
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
        """(what is blocked and its limit, seconds until the next attempt may run), or None if both may try."""
        now = self._clock()
        for what, key, limit in ((f"user {user!r}", "u:" + user, self.max_user_failures),
                                 (f"address {addr}", "a:" + addr, self.max_addr_failures)):
            q = self._recent(key, now)
            if q is not None and len(q) >= limit:
                return f"{what} ({limit} in {self.window_s:g} s)", q[0] + self.window_s - now
        return None

    def failed(self, user: str, addr: str) -> None:
        now = self._clock()
        for key in ("u:" + user, "a:" + addr):
            self._failures.setdefault(key, collections.deque()).append(now)
        if len(self._failures) > 100_000:  # a flood of names: forget the quiet ones
            for key in list(self._failures):
                self._recent(key, now)
