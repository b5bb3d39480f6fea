"""The ``lease`` workload: keys whose lease's keep-alives stop must vanish, never early, not too late.

Each lease goes through three phases, driven by whichever worker is free:

  grant      grant a lease of TTL seconds and put its key with it (one op)
  keepalive  a few keep-alives, TTL/3 apart
  expiring   linearizable reads of its key until it is gone

and the final read (after the heal, and after TTL + a few election timeouts)
lists every key left under the prefix: none may be left.

The checker, per lease (times are the history's, on the harness's clock):

  never early   the key is gone (a read found it missing, or a keep-alive was
                answered "no such lease") only after the invoke of its last
                keep-alive answered with a TTL, plus TTL. Until its clock runs out
                on the leader, nobody may remove it.
  not late      no read invoked after its due time finds the key, where due is
                the latest of (the completion of its last keep-alive, whatever
                the outcome) and (the last leader change seen before the read, or
                up to WATCH_LAG_S after it: the harness polls every member's
                status, and sees a new leader up to ~0.4 s after its election),
                plus TTL + one election timeout. A new leader restarts every
                lease's clock, so faults that change the leader move the due time.
  not revived   no keep-alive invoked after the key was gone answers with a TTL.
  gone at last  no key is left at the final read.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvstore.jepsen.history import OK, Event, Operation, pair_events
from kvstore.jepsen.workloads import PREFIX, Op, Store, Verdict, Workload

KEYS = f"{PREFIX}lease/"
NS = 1_000_000_000
WATCH_LAG_S = 1.0  # how late the harness's leader watch may see an election (interval + status timeout, doubled)


class LeaseStore(Store, Protocol):
    """What the lease workload needs beyond Store."""

    async def grant(self, ttl: int) -> tuple[int, int]: ...  # (lease id, TTL granted)
    async def put_leased(self, key: str, value: str, lease: int) -> None: ...
    async def keep_alive(self, lease: int) -> int: ...  # the TTL; 0: no such lease


@dataclass
class _Lease:
    n: int
    lease: int = 0
    ttl: int = 0
    phase: str = "grant"   # grant -> keepalive -> expiring -> done
    keepalives_left: int = 0
    next_at: float = 0.0   # time.monotonic() of its next keep-alive or read
    busy: bool = False


class LeaseWorkload(Workload):
    name = "lease"
    mutations = frozenset({"grant", "keepalive"})

    def __init__(self, seed: int | None = None, ttl: int = 2, max_keepalives: int = 6,
                 active: int = 8, read_every: float = 0.1) -> None:
        super().__init__(seed)
        self.ttl = ttl
        self.max_keepalives = max_keepalives
        self.active = active
        self.read_every = read_every
        self._leases: dict[int, _Lease] = {}
        self._next = 0
        self.election_s = 0.5  # set by the runner from its --tick-ms and --election-ticks
        self.leader_changes: list[int] = []  # times (history clock) a new leader was first seen

    def observe_run(self, *, election_s: float, leader_changes: list[int]) -> None:
        self.election_s = election_s
        self.leader_changes = sorted(leader_changes)

    def key(self, n: int) -> str:
        return f"{KEYS}{n}"

    # ------------------------------------------------------------ generating

    def next_op(self) -> Op:
        with self._lock:
            now = time.monotonic()
            due = [ls for ls in self._leases.values()
                   if not ls.busy and ls.phase in ("keepalive", "expiring") and ls.next_at <= now]
            if due:
                ls = min(due, key=lambda x: x.next_at)
                ls.busy = True
                if ls.phase == "keepalive":
                    return Op("keepalive", ls.n, ls.lease)
                return Op("read", ls.n)
            live = [ls for ls in self._leases.values() if ls.phase != "done"]
            free = [ls for ls in live if not ls.busy and ls.phase in ("keepalive", "expiring")]
            if len(live) >= self.active and free:  # nothing due: read a key (a kept-alive one must be there)
                ls = self.rng.choice(free)
                ls.busy = True
                return Op("read", ls.n)
            n, self._next = self._next, self._next + 1
            self._leases[n] = _Lease(n, busy=True)
            return Op("grant", n, self.ttl)

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        s: LeaseStore = store  # type: ignore[assignment]
        ls = self._leases.get(op.key) if op.key is not None else None
        try:
            if op.f == "grant":
                assert ls is not None
                return await self._grant(s, ls)
            if op.f == "keepalive":
                assert ls is not None
                return await self._keep_alive(s, ls)
            if op.f == "read":
                present = await s.get(self.key(op.key)) is not None
                if ls is not None and ls.phase == "expiring":
                    with self._lock:
                        ls.next_at = time.monotonic() + self.read_every
                        if not present:
                            ls.phase = "done"
                return OK, present
            if op.f == "final":
                return OK, await self._final(s)
            raise ValueError(f"unknown op {op.f}")
        finally:
            if ls is not None:
                with self._lock:
                    ls.busy = False

    async def _grant(self, s: LeaseStore, ls: _Lease) -> tuple[str, Any]:
        try:
            lease, ttl = await s.grant(self.ttl)
        except Exception:
            with self._lock:
                ls.phase = "done"  # abandoned: if it exists, it expires (the final read checks)
            raise
        try:
            await s.put_leased(self.key(ls.n), "x", lease)
        except Exception:
            with self._lock:
                ls.phase = "done"
            raise
        with self._lock:
            ls.lease, ls.ttl = lease, ttl
            ls.phase = "keepalive"
            ls.keepalives_left = self.rng.randint(0, self.max_keepalives)
            ls.next_at = time.monotonic() + ttl / 3
            if not ls.keepalives_left:
                ls.phase, ls.next_at = "expiring", time.monotonic()
        return OK, {"lease": lease, "ttl": ttl}

    async def _keep_alive(self, s: LeaseStore, ls: _Lease) -> tuple[str, Any]:
        try:
            ttl = await s.keep_alive(ls.lease)
        finally:
            with self._lock:
                ls.keepalives_left -= 1
                ls.next_at = time.monotonic() + ls.ttl / 3
                if ls.keepalives_left <= 0:
                    ls.phase, ls.next_at = "expiring", time.monotonic()
        if ttl <= 0:
            with self._lock:
                ls.phase, ls.next_at = "expiring", time.monotonic()
        return OK, ttl

    async def _final(self, s: LeaseStore) -> list[str]:
        """The keys left, once every lease has had time to expire (retried while some are left)."""
        left: list[str] = []
        for _ in range(3):
            await asyncio.sleep(self.ttl + 4 * self.election_s)
            left = sorted(await s.get_prefix(KEYS))
            if not left:
                break
        return left

    def final_ops(self) -> list[Op]:
        return [Op("final")]

    # ------------------------------------------------------------ checking

    def check(self, events: Sequence[Event]) -> Verdict:
        return check_leases(pair_events(events), self.election_s, self.leader_changes)


def check_leases(operations: Sequence[Operation], election_s: float, leader_changes: Sequence[int]) -> Verdict:
    """Judge a lease history (see the module docstring for the four rules)."""
    by_key: dict[Any, list[Operation]] = {}
    final: Operation | None = None
    for op in operations:
        if op.f == "final" and op.outcome == OK:
            final = op
        elif op.f in ("grant", "keepalive", "read") and op.key is not None:
            by_key.setdefault(op.key, []).append(op)
    early: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    revived: list[dict[str, Any]] = []
    latencies: list[float] = []
    checked = 0
    for n, ops in sorted(by_key.items()):
        grant = next((o for o in ops if o.f == "grant"), None)
        if grant is None or grant.outcome != OK:
            continue  # never (certainly) created: only the final read speaks for it
        checked += 1
        ttl_ns = int(grant.output["ttl"]) * NS
        kept = [o for o in ops if o.f == "keepalive" and o.outcome == OK and o.output and o.output > 0]
        alive_from = max([grant.invoke_time, *(o.invoke_time for o in kept)])
        last_sent = max([grant.complete_time or grant.invoke_time,
                         *((o.complete_time or o.invoke_time) for o in ops if o.f == "keepalive")])
        gone = [o.complete_time for o in ops if o.complete_time is not None and o.outcome == OK and (
            (o.f == "read" and o.output is False) or (o.f == "keepalive" and o.output == 0))]
        gone_at = min(gone) if gone else None
        if gone_at is not None:
            latencies.append((gone_at - alive_from) / NS)
            if gone_at < alive_from + ttl_ns:
                early.append({"key": n, "lease": grant.output["lease"],
                              "gone_s_before_ttl": round((alive_from + ttl_ns - gone_at) / NS, 3)})
            for o in kept:
                if o.invoke_time > gone_at:
                    revived.append({"key": n, "op": o.index})
        for o in ops:
            if o.f == "read" and o.outcome == OK and o.output is True:
                changes = [t for t in leader_changes if t <= o.invoke_time + WATCH_LAG_S * NS]
                due = max(last_sent, changes[-1] if changes else 0) + ttl_ns + int(election_s * NS)
                if o.invoke_time > due:
                    late.append({"key": n, "op": o.index, "s_after_due": round((o.invoke_time - due) / NS, 3)})
    left = list(final.output) if final is not None else None
    problems = []
    if early:
        problems.append(f"{len(early)} keys gone before their TTL")
    if late:
        problems.append(f"{len(late)} reads found a key after it was due to expire")
    if revived:
        problems.append(f"{len(revived)} keep-alives renewed a lease already gone")
    if left:
        problems.append(f"{len(left)} keys never expired")
    details: dict[str, Any] = {
        "leases": checked, "expired_seen": len(latencies), "early": early[:20], "late": late[:20],
        "revived": revived[:20], "left_at_final_read": left,
        "gone_after_last_keepalive_s": _spread(latencies),
    }
    if final is None:
        return Verdict(False, "the final read never succeeded: cannot judge", details, unknown=True)
    if problems:
        return Verdict(False, "; ".join(problems), details)
    spread = details["gone_after_last_keepalive_s"]
    return Verdict(True, f"{checked} leases: none gone early, none late, none left "
                         f"(gone {spread.get('min', 0):.2f}-{spread.get('max', 0):.2f}s after the last keep-alive)",
                   details)


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


__all__ = ["LeaseWorkload", "LeaseStore", "check_leases"]
