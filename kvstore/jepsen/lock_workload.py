"""The ``lock`` workload: fenced increments of one counter under one lock.

Each op takes the lock (its own lease of TTL seconds), reads the counter,
holds the lock a while, then writes count + 1 BLINDLY (no compare on the
counter) but fenced: ``Txn().when(lock.guard())``. The counter's value is
"<count> <token>": the token of the acquisition that wrote it. One hold in
ten is a stalled holder (a process pause, as in Jepsen's and Kleppmann's
examples): its keep-alives stop for 1.5 to 2.5 TTLs, so its lease runs out
and the lock passes on while it still believes it holds it; partitions,
kills and pauses of members meanwhile move leadership and lease clocks.

The fence is the only thing between a stale holder and a lost increment, so
the checker holds the history to:

  no increment lost   every acknowledged increment wrote a different count,
                      and the final count is at least their number and at
                      most the number of increments that may have happened;
  no stale token      ordered by the count they wrote, acknowledged
                      increments carry strictly increasing tokens (a holder
                      whose lock passed on was never accepted after its
                      successor).

``lock-unfenced`` is the same workload writing without the guard: the
checker must then find lost increments (the teeth).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvstore.jepsen.history import FAIL, INFO, OK, Event, Operation, pair_events
from kvstore.jepsen.workloads import PREFIX, Op, Store, Verdict, Workload

LOCK = f"{PREFIX}lock/mutex"
COUNTER = f"{PREFIX}lock/counter"


class LockStore(Store, Protocol):
    """What the lock workload needs beyond Store."""

    async def locked_increment(self, lock: str, counter: str, ttl: int, hold_s: float, fenced: bool,
                               acquire_timeout: float) -> tuple[int, int] | str: ...
    # (count written, token) if the write was accepted; else why not: "lock" or "fence"


def parse_counter(raw: str | None) -> tuple[int, int]:
    """(count, token) of the counter's value ("0 0" before any increment)."""
    if not raw:
        return 0, 0
    count, token = raw.split()
    return int(count), int(token)


class LockWorkload(Workload):
    name = "lock"
    mutations = frozenset({"inc"})

    def __init__(self, seed: int | None = None, ttl: int = 2, fenced: bool = True,
                 acquire_timeout: float = 3.0) -> None:
        super().__init__(seed)
        self.ttl = ttl
        self.fenced = fenced
        self.acquire_timeout = acquire_timeout

    def next_op(self) -> Op:
        with self._lock:
            roll = self.rng.random()
            # mostly short holds; one in ten a stalled holder (a negative hold: keep-alives stop too)
            hold = self.rng.uniform(0, 0.3) if roll < 0.9 else -self.rng.uniform(self.ttl * 1.5, self.ttl * 2.5)
        return Op("inc", None, round(hold, 3))

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        s: LockStore = store  # type: ignore[assignment]
        if op.f == "read":
            return OK, list(parse_counter(await s.get(COUNTER)))
        done = await s.locked_increment(LOCK, COUNTER, self.ttl, op.value, self.fenced, self.acquire_timeout)
        if isinstance(done, str):
            return FAIL, {"hold": op.value, "refused": done}  # nothing written
        return OK, list(done)

    def final_ops(self) -> list[Op]:
        return [Op("read")]

    def check(self, events: Sequence[Event]) -> Verdict:
        return check_lock(pair_events(events))


def check_lock(operations: Sequence[Operation]) -> Verdict:
    incs = [op for op in operations if op.f == "inc"]
    acked = sorted((tuple(op.output) for op in incs if op.outcome == OK), key=lambda x: x[0])
    maybe = sum(1 for op in incs if op.outcome == INFO)
    reads = [op for op in operations if op.f == "read" and op.outcome == OK]
    refused = [op.output.get("refused") for op in incs if op.outcome == FAIL and isinstance(op.output, dict)]
    details: dict[str, Any] = {"acknowledged": len(acked), "unknown": maybe,
                               "refused_by_fence": refused.count("fence"), "not_acquired": refused.count("lock")}
    if not reads:
        return Verdict(False, "no final read succeeded: cannot judge", details, unknown=True)
    final_count, final_token = reads[-1].output
    details["final"] = {"count": final_count, "token": final_token}
    problems = []
    counts = [c for c, _ in acked]
    duplicated = sorted({c for c in counts if counts.count(c) > 1})
    if duplicated:
        problems.append(f"{len(duplicated)} counts written twice (lost increments)")
    if final_count < len(acked):
        problems.append(f"final count {final_count} < {len(acked)} acknowledged increments")
    if final_count > len(acked) + maybe:
        problems.append(f"final count {final_count} > {len(acked)} acknowledged + {maybe} unknown")
    stale = [{"count": c, "token": t, "after_token": prev_t}
             for (_, prev_t), (c, t) in zip(acked, acked[1:]) if t <= prev_t]
    if stale:
        problems.append(f"{len(stale)} increments accepted with a stale token")
    details.update(duplicated_counts=duplicated[:20], stale_tokens=stale[:20])
    if problems:
        return Verdict(False, "; ".join(problems), details)
    return Verdict(True, f"{len(acked)} increments, none lost, tokens strictly increasing "
                         f"({details['refused_by_fence']} stale writes refused by the fence, "
                         f"{details['not_acquired']} lock waits given up)", details)


__all__ = ["LockWorkload", "LockStore", "check_lock", "parse_counter"]
