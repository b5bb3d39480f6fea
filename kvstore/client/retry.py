"""Retry policies: when to try again, how long to wait, and when to give up.

A policy is a small immutable object handed to the client. The client asks it
``backoff(n)`` before the n-th wait (n counts from 0) and stops when the call's
total deadline or ``max_attempts`` is reached. Redirects to a named leader are
not failures and are followed without waiting.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from collections.abc import Callable

import grpc

__all__ = ["RetryPolicy", "FixedInterval", "ExponentialBackoff", "NoRetry", "DEFAULT_RETRYABLE"]

#: Statuses that say "not now" rather than "never": a member down, no leader
#: yet, an attempt timed out (the member may be paused), it shed load, or it
#: cancelled the call because it was stopping (a member that stops its server
#: cancels calls it had received but not started; the caller's own
#: cancellation raises asyncio.CancelledError instead, and a closed client
#: raises ClientClosed, so neither is ever retried). For mutations these are
#: safe to retry because every retry re-sends the same RequestId and the state
#: machine answers a duplicate with the first result.
DEFAULT_RETRYABLE: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Base policy: which statuses to retry, how many times, how long per attempt.

    ``deadline`` is the total time a call may take, all attempts and waits
    included (None: use the client's ``timeout``). ``attempt_timeout`` bounds
    one attempt so a hung or paused member cannot eat the whole deadline.
    ``max_attempts`` (None: unlimited) bounds attempts within the deadline.
    """

    retryable: frozenset[grpc.StatusCode] = DEFAULT_RETRYABLE
    deadline: float | None = None
    attempt_timeout: float = 2.0
    max_attempts: int | None = None

    def backoff(self, n: int) -> float:
        """Seconds to wait before retry number ``n`` (0-based)."""
        return 0.0

    def is_retryable(self, code: grpc.StatusCode) -> bool:
        return code in self.retryable

    def may_attempt(self, attempts_made: int) -> bool:
        return self.max_attempts is None or attempts_made < self.max_attempts


@dataclass(frozen=True)
class NoRetry(RetryPolicy):
    """One attempt only (redirects are still followed within that attempt budget of one)."""

    max_attempts: int | None = 1


@dataclass(frozen=True)
class FixedInterval(RetryPolicy):
    """Wait the same ``interval`` before every retry."""

    interval: float = 0.05

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError("interval must be >= 0")

    def backoff(self, n: int) -> float:
        return self.interval


@dataclass(frozen=True)
class ExponentialBackoff(RetryPolicy):
    """Exponential backoff with full jitter (AWS architecture blog, 2015).

    Retry ``n`` waits a uniform random time in ``[0, min(cap, base * multiplier**n)]``;
    jitter spreads the retries of many clients after a leader change so they do
    not arrive at the new leader in lockstep. ``jitter=False`` gives the bare
    exponential (useful in tests and for a single client).

    The default cap is what a failover costs a client on top of the election:
    it finds the new leader at its first retry after the election, about
    cap/3 later on average (measured with benchmarks/failover.py: 0.25 s gave
    a median 115 ms from the new leader's election to the first
    acknowledged write, max 240 ms). etcd's client retries every 25 ms; 0.1 s
    is between the two.
    """

    base: float = 0.01
    cap: float = 0.1
    multiplier: float = 2.0
    jitter: bool = True
    rng: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.multiplier < 1:
            raise ValueError("need base >= 0, cap >= 0, multiplier >= 1")

    def ceiling(self, n: int) -> float:
        """The largest wait before retry ``n``."""
        # Cap the exponent so huge n cannot overflow a float.
        return min(self.cap, self.base * self.multiplier ** min(n, 64))

    def backoff(self, n: int) -> float:
        top = self.ceiling(n)
        return top * self.rng() if self.jitter else top
