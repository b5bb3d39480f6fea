"""A client session: the identity that makes retried writes exactly-once.

Every mutation (or Batch RPC holding mutations) takes the next ``seq``. A retry
re-sends the same ``(client_id, seq)``, so the state machine answers it with
the first result instead of applying it twice. ``acked_below`` tells the server
which answers it may forget: every seq below it has been delivered (or given
up on). With many requests in flight it is the lowest seq still outstanding.

Seq 1 opens the session on the cluster (RequestId.opens_session). Its attempts
carry the flag only while no earlier attempt may have reached the cluster, so
at most one entry per client_id can ever create the session. Requests after
it wait until seq 1 is over, so none reaches the cluster before the session
exists. A cluster that no longer holds
the session (it expired or was evicted) refuses every later request with
"session expired" (client.errors.SessionExpired) rather than risk applying a
retry twice; the client then starts a new session for what comes next.
"""
from __future__ import annotations

import asyncio
import secrets

__all__ = ["Session", "new_client_id"]


def new_client_id() -> int:
    """A random non-zero 63-bit id (fits a signed int64 wherever it is stored)."""
    while True:
        cid = secrets.randbits(63)
        if cid:
            return cid


class Session:
    """Sequence numbering and ``acked_below`` tracking for one client.

    Not thread-safe by itself: the client uses it from one event loop.
    ``begin`` and ``finish`` are O(1) amortised.
    """

    __slots__ = ("client_id", "_next_seq", "_outstanding", "_low", "_opened")

    def __init__(self, client_id: int | None = None) -> None:
        if client_id is not None and not (0 < client_id < 1 << 63):
            raise ValueError("client_id must be a non-zero 63-bit integer")
        self.client_id = client_id if client_id is not None else new_client_id()
        self._next_seq = 1
        self._outstanding: set[int] = set()
        self._low = 1  # lowest seq that may still be outstanding
        self._opened: asyncio.Event | None = None  # set once seq 1 is over (made on first use)

    def begin(self) -> int:
        """Allocate the seq of a new mutation; it stays outstanding until ``finish``."""
        seq = self._next_seq
        self._next_seq = seq + 1
        self._outstanding.add(seq)
        return seq

    def opens(self, seq: int, maybe_applied: bool) -> bool:
        """Whether an attempt of ``seq`` carries opens_session: seq 1, while no earlier
        attempt of it may have been applied (else a retry could open a new session on a
        cluster that forgot the first and apply seq 1 twice)."""
        return seq == 1 and not maybe_applied

    async def wait_opened(self, seq: int) -> None:
        """Hold a request after seq 1 until seq 1 is over (answered or given up)."""
        if seq > 1 and 1 in self._outstanding:
            if self._opened is None:
                self._opened = asyncio.Event()
            await self._opened.wait()

    def finish(self, seq: int) -> None:
        """The answer for ``seq`` was delivered (or the call was given up)."""
        if seq == 1 and self._opened is not None:
            self._opened.set()
        self._outstanding.discard(seq)
        if seq == self._low:
            low, outstanding, end = self._low, self._outstanding, self._next_seq
            while low < end and low not in outstanding:
                low += 1
            self._low = low

    @property
    def acked_below(self) -> int:
        """Lowest seq whose answer the caller has not received yet."""
        return self._low

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)
