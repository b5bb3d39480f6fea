"""Linearizable reads through ReadIndex, batched.

A read may be served locally once this member has confirmed, after the read
arrived, that it is still the leader (a heartbeat round acknowledged by a
quorum) and has applied everything up to the commit index at that moment.
Confirmations cost a round trip, so they are shared: every read queued while
no confirmation is in flight rides on the next one. One confirmation is in
flight at a time; reads arriving meanwhile form the next batch.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Callable

from .errors import RequestFailed


class ReadIndex:
    def __init__(self, request: Callable[[bytes], None], timeout_s: float, timeout_error: Callable[[], RequestFailed]):
        """`request(ctx)` asks raft for a read index (RawNode.read_index + wake the loop)."""
        self._request = request
        self._timeout_s = timeout_s
        self._timeout_error = timeout_error
        self._queued: list[asyncio.Future] = []
        self._inflight: tuple[bytes, list[asyncio.Future], float] | None = None  # ctx, batch, started
        self._confirmed: list[tuple[int, int, asyncio.Future]] = []  # heap of (index, seq, future)
        self._seq = itertools.count()
        self._applied = 0
        self.batches_started = 0

    def wait(self) -> asyncio.Future:
        """A future resolved once a linearizable read may be served locally."""
        fut = asyncio.get_running_loop().create_future()
        # The reader may be gone (its deadline passed, its RPC was cancelled) when the
        # batch fails: mark the error seen, or asyncio logs "Future exception was
        # never retrieved" with a traceback for every such read.
        fut.add_done_callback(_retrieve_exception)
        self._queued.append(fut)
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
        """Give up on a confirmation that never came (lost messages, a partition)."""
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


def _retrieve_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
