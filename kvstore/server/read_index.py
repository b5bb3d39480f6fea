"""Linearizable reads through ReadIndex, batched.

A read may be served locally once this member has confirmed, after the read
arrived, that it is still the leader (a heartbeat round acknowledged by a
quorum) and has applied everything up to the commit index at that moment.
Confirmations cost a round trip, so they are shared: every read queued while
no confirmation is in flight rides on the next one. One confirmation is in
flight at a time; reads arriving meanwhile form the next batch.

A read may carry a deadline: `check_timeouts` (every tick) fails the ones
whose deadline passed, so the caller simply awaits its future (no
`asyncio.wait_for` + `shield` per read, as for Proposals).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

from .errors import RequestFailed


class ReadIndex:
    def __init__(self, request: Callable[[bytes], None], timeout_s: float, timeout_error: Callable[[], RequestFailed],
                 deadline_error: Callable[[], RequestFailed] | None = None):
        """`request(ctx)` asks raft for a read index (RawNode.read_index + wake the loop)."""
        self._request = request
        self._timeout_s = timeout_s
        self._timeout_error = timeout_error
        self._deadline_error = deadline_error or timeout_error
        self._deadlines: list[tuple[float, asyncio.Future]] = []  # swept by check_timeouts
        self._queued: list[asyncio.Future] = []
        self._inflight: tuple[bytes, list[asyncio.Future], float] | None = None  # ctx, batch, started
        self._confirmed: list[tuple[int, int, asyncio.Future]] = []  # heap of (index, seq, future)
        self._seq = itertools.count()
        self._applied = 0
        self.batches_started = 0

    def wait(self, deadline: float | None = None) -> asyncio.Future:
        """A future resolved once a linearizable read may be served locally.

        With a deadline (loop.time()), it fails with `deadline_error` once
        that passes, within a tick.
        """
        fut = asyncio.get_running_loop().create_future()
        self._queued.append(fut)
        if deadline is not None:
            self._deadlines.append((deadline, fut))
        self._maybe_start()
        return fut

    def _maybe_start(self) -> None:
        if self._inflight is not None or not self._queued:
            return
        batch, self._queued = self._queued, []
        ctx = b"ri:%d" % next(self._seq)
        self._inflight = (ctx, batch, time.monotonic())
        self.batches_started += 1
        self._request(ctx)

    def on_read_state(self, index: int, ctx: bytes) -> None:
        """Raft confirmed leadership for the read identified by `ctx`: reads may go at `index`."""
        if self._inflight is None or self._inflight[0] != ctx:
            return  # a batch we already gave up on
        _, batch, _ = self._inflight
        self._inflight = None
        for fut in batch:
            if fut.done():
                continue
            if index <= self._applied:
                fut.set_result(index)
            else:
                heapq.heappush(self._confirmed, (index, next(self._seq), fut))
        self._maybe_start()

    def on_applied(self, applied: int) -> None:
        self._applied = applied
        while self._confirmed and self._confirmed[0][0] <= applied:
            index, _, fut = heapq.heappop(self._confirmed)
            if not fut.done():
                fut.set_result(index)

    def check_timeouts(self) -> None:
        """Fail reads past their deadline; give up on a confirmation that never came (lost messages, a partition)."""
        if self._deadlines:
            now = asyncio.get_running_loop().time()
            late = [fut for deadline, fut in self._deadlines if deadline <= now and not fut.done()]
            self._deadlines = [(d, f) for d, f in self._deadlines if d > now and not f.done()]
            if late:
                self._fail(late, self._deadline_error())
        if self._inflight is not None and time.monotonic() - self._inflight[2] > self._timeout_s:
            _, batch, _ = self._inflight
            self._inflight = None
            self._fail(batch, self._timeout_error())
            self._maybe_start()

    def fail_pending(self, error: RequestFailed) -> None:
        """Leadership lost: reads not yet confirmed cannot be (confirmed ones stay valid)."""
        batch = self._queued
        self._queued = []
        if self._inflight is not None:
            batch = batch + self._inflight[1]
            self._inflight = None
        self._fail(batch, error)

    def fail_all(self, error: RequestFailed) -> None:
        self.fail_pending(error)
        confirmed, self._confirmed = self._confirmed, []
        self._fail([f for _, _, f in confirmed], error)

    @staticmethod
    def _fail(futures, error: RequestFailed) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)
                # The reader may be gone (its RPC was cancelled) in this same loop turn:
                # mark the error seen, or asyncio logs "Future exception was never
                # retrieved" with a traceback for every such read. An awaiting reader
                # still gets it raised.
                fut.exception()
