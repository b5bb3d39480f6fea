"""Clients waiting for their proposals to commit and apply.

A proposal is identified by `Command.proposal_id`: this member's id in the
high 16 bits and a counter below, started at a random point so ids never
repeat across restarts (an entry proposed by a previous incarnation can still
commit later). When the entry is applied, the state machine's result goes to
the waiter. When this member stops being leader or its term moves on, every
waiter is failed "leadership lost; outcome unknown": its entry may or may not
survive under the next leader, and only a retry with the same RequestId
(deduplicated by the state machine) can tell.

Deadlines. A waiter registered with a deadline is failed "deadline passed;
outcome unknown" by a sweep that runs every SWEEP_S while anyone waits, so the
caller can simply `await` the future: no `asyncio.wait_for` + `shield` (two
extra futures, a timer and four callbacks per write). The answer may come up to
SWEEP_S late, long after the client's own deadline has fired anyway.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from .errors import RequestFailed, outcome_unknown_deadline

_COUNTER_BITS = 48
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
SWEEP_S = 0.05


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future
    term: int
    request_key: tuple[int, int]  # (client_id, seq), checked again on apply
    deadline: float | None  # loop.time() after which the waiter fails


class Proposals:
    def __init__(self, member_id: int) -> None:
        self._high = (member_id & 0xFFFF) << _COUNTER_BITS
        self._counter = random.getrandbits(_COUNTER_BITS - 1)
        self._waiters: dict[int, _Waiter] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.failed = 0  # waiters failed so far (kvstore_server_proposals_failed_total)

    def __len__(self) -> int:
        return len(self._waiters)

    def next_id(self) -> int:
        self._counter = (self._counter + 1) & _COUNTER_MASK
        return self._high | self._counter

    def register(
        self, proposal_id: int, term: int, request_key: tuple[int, int], deadline: float | None = None
    ) -> asyncio.Future:
        """A future for the proposal's result; with a deadline (loop.time()), it fails once that passes."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters[proposal_id] = _Waiter(fut, term, request_key, deadline)
        if deadline is not None and self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._expire)
        return fut

    def forget(self, proposal_id: int) -> None:
        """The caller gave up (deadline, cancellation); the entry may still apply."""
        self._waiters.pop(proposal_id, None)

    def resolve(self, proposal_id: int, request_key: tuple[int, int], result) -> None:
        w = self._waiters.get(proposal_id)
        if w is None or w.request_key != request_key:
            return
        del self._waiters[proposal_id]
        if not w.future.done():
            w.future.set_result(result)

    def resolve_applied(self, origins, results) -> None:
        """Resolve from StateMachine.apply(entries, origins): one (proposal_id, request_key) per result."""
        waiters = self._waiters
        for origin, result in zip(origins, results):
            if origin is None:
                continue  # a no-op, an entry already applied, or no Command at all
            pid, key = origin
            w = waiters.get(pid)
            if w is None or w.request_key != key:
                continue  # proposed elsewhere, or its caller gave up
            del waiters[pid]
            if not w.future.done():
                w.future.set_result(result)

    def fail_older_than(self, term: int, error: RequestFailed) -> None:
        """Fail waiters proposed in a term before `term` (their leader is gone)."""
        for pid in [p for p, w in self._waiters.items() if w.term < term]:
            self._fail(pid, error)

    def fail(self, proposal_id: int, error: RequestFailed) -> None:
        if proposal_id in self._waiters:
            self._fail(proposal_id, error)

    def fail_all(self, error: RequestFailed) -> None:
        for pid in list(self._waiters):
            self._fail(pid, error)

    def _expire(self) -> None:
        self._sweep = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for pid in [p for p, w in self._waiters.items() if w.deadline is not None and w.deadline <= now]:
            self._fail(pid, outcome_unknown_deadline())
        if any(w.deadline is not None for w in self._waiters.values()):
            self._sweep = loop.call_later(SWEEP_S, self._expire)

    def _fail(self, pid: int, error: RequestFailed) -> None:
        w = self._waiters.pop(pid)
        self.failed += 1
        if not w.future.done():
            w.future.set_exception(error)
            # Marked as retrieved: a caller who gave up in this same loop turn (deadline, cancelled
            # RPC) never reads it, and asyncio would log it with a traceback. An awaiting caller
            # still gets it raised.
            w.future.exception()
