"""Clients waiting for their proposals to commit and apply.

A proposal is identified by `Command.proposal_id`: this member's id in the
high 16 bits and a counter below, started at a random point so ids never
repeat across restarts (an entry proposed by a previous incarnation can still
commit later). When the entry is applied, the state machine's result goes to
the waiter. When this member stops being leader or its term moves on, every
waiter is failed "leadership lost; outcome unknown": its entry may or may not
survive under the next leader, and only a retry with the same RequestId
(deduplicated by the state machine) can tell.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from .errors import RequestFailed

_COUNTER_BITS = 48
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future
    term: int
    request_key: tuple[int, int]  # (client_id, seq), checked again on apply


class Proposals:
    def __init__(self, member_id: int) -> None:
        self._high = (member_id & 0xFFFF) << _COUNTER_BITS
        self._counter = random.getrandbits(_COUNTER_BITS - 1)
        self._waiters: dict[int, _Waiter] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def next_id(self) -> int:
        self._counter = (self._counter + 1) & _COUNTER_MASK
        return self._high | self._counter

    def register(self, proposal_id: int, term: int, request_key: tuple[int, int]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        # Failed in the same loop turn as its caller gave up (deadline, cancelled RPC): nobody
        # reads the error, and asyncio would log it with a traceback.
        fut.add_done_callback(_retrieve_exception)
        self._waiters[proposal_id] = _Waiter(fut, term, request_key)
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

    def _fail(self, pid: int, error: RequestFailed) -> None:
        w = self._waiters.pop(pid)
        if not w.future.done():
            w.future.set_exception(error)


def _retrieve_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
