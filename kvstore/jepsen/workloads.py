"""What the clients do during a run, and how each workload's history is judged.

- ``register``: read / write / cas on a few keys, each an independent register;
  judged by the linearizability checker (per key). Keys are retired after a
  bounded number of operations, as Jepsen's independent keys are, so each
  key's sub-history stays small enough to check exactly.
- ``set``: unique adds, then one final read; every acknowledged add must be
  there, once (lost / duplicated / unexpected elements are reported).
- ``bank``: transfers between accounts through a Txn that compares both
  balances; every read must see the initial total and no negative balance.
- ``watch``: writers put unique values under one prefix; watchers open a
  watch on it at a recent revision and record the events they get. Each
  stream must be an ordered, gap-free, duplicate-free slice of the
  committed history (read by one final watch from revision 1) starting at
  the requested revision, and every acknowledged write must be in it.

Workloads talk to a :class:`Store` (the harness's narrow view of the client),
so they can be unit-tested against an in-memory store. Outcomes follow the
history schema: ``ok`` it happened, ``fail`` it certainly did not (a failed
compare, an error the server marks as not applied), ``info`` unknown. For a
function in ``answered_fails`` (a register's cas) ``fail`` says more than "did
not happen": the compare did not match. An error, even one proving the call
was not applied, says nothing about the compare, so the runner records it as
``info`` there.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvstore.jepsen.history import FAIL, INFO, OK, Event, Operation, pair_events
from kvstore.jepsen.models import RegisterModel

PREFIX = "jepsen/"


class Store(Protocol):
    """The few calls workloads need; the runner adapts the real client to it.

    Reads are linearizable. Raising an exception means the call failed; the
    store's :meth:`outcome_of` says whether it certainly was not applied.
    """

    async def get(self, key: str) -> str | None: ...
    async def put(self, key: str, value: str) -> None: ...
    async def cas(self, key: str, expected: str, new: str) -> bool: ...
    async def get_prefix(self, prefix: str) -> dict[str, str]: ...
    async def swap(self, expected: dict[str, str], new: dict[str, str]) -> bool: ...
    def outcome_of(self, error: BaseException, mutation: bool) -> str: ...
    # the watch workload's
    async def put_revision(self, key: str, value: str) -> int: ...
    async def watch(self, prefix: str, start: int, max_events: int, seconds: float) -> tuple[list, str]: ...
    async def history(self, prefix: str) -> list: ...


@dataclass(frozen=True)
class Op:
    """An operation to invoke: the history's ``f``, ``key`` and ``value``."""

    f: str
    key: Any = None
    value: Any = None


@dataclass
class Verdict:
    """A workload's judgement of a history; ``details`` goes into verdict.json."""

    valid: bool
    summary: str
    details: dict[str, Any]
    #: the history could not be judged (e.g. no final read succeeded): neither valid nor not
    unknown: bool = False


class Workload:
    """Base: generate operations, run them against a store, judge the history."""

    name = "workload"
    mutations: frozenset[str] = frozenset()
    #: functions whose ``fail`` is an answer the checker holds the history to
    #: (the model's ``definite_fail_functions``), not just "it did not happen"
    answered_fails: frozenset[str] = frozenset()

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)
        self._lock = threading.Lock()

    async def setup(self, store: Store) -> None:
        """Write the initial state (retried by the runner until it succeeds)."""

    def next_op(self) -> Op:
        raise NotImplementedError

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        """Run ``op``; return (outcome, value). Exceptions are classified by the runner."""
        raise NotImplementedError

    def final_ops(self) -> list[Op]:
        """Reads issued after the cluster is healed, recorded like any other call."""
        return []

    def check(self, events: Sequence[Event]) -> Verdict:
        raise NotImplementedError

    def observe_run(self, *, election_s: float, leader_changes: list[int]) -> None:
        """What the runner saw besides the history, before check(): the election timeout and the
        times (history clock) each new leader was first seen. Only the lease checker needs them."""


# ---------------------------------------------------------------- register

class RegisterWorkload(Workload):
    """Independent registers: values are small ints so reads often meet writes."""

    name = "register"
    mutations = frozenset({"write", "cas"})
    answered_fails = RegisterModel.definite_fail_functions  # a cas fail: the compare did not match

    def __init__(self, seed: int | None = None, keys: int = 3, ops_per_key: int = 200,
                 values: int = 5, read_ratio: float = 0.5) -> None:
        super().__init__(seed)
        self.values = values
        self.read_ratio = read_ratio
        self.ops_per_key = ops_per_key
        self._next_key = keys
        self._active = {i: 0 for i in range(keys)}
        self.used: list[int] = list(range(keys))

    def key(self, n: int) -> str:
        return f"{PREFIX}register/{n}"

    def _pick_key(self) -> int:
        with self._lock:
            n = self.rng.choice(sorted(self._active))
            self._active[n] += 1
            if self._active[n] >= self.ops_per_key:  # retire it, open a fresh key
                del self._active[n]
                self._active[self._next_key] = 0
                self.used.append(self._next_key)
                self._next_key += 1
            return n

    def next_op(self) -> Op:
        n = self._pick_key()
        roll = self.rng.random()
        if roll < self.read_ratio:
            return Op("read", n)
        if roll < self.read_ratio + (1 - self.read_ratio) / 2:
            return Op("write", n, self.rng.randrange(self.values))
        return Op("cas", n, [self.rng.randrange(self.values), self.rng.randrange(self.values)])

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        key = self.key(op.key)
        if op.f == "read":
            raw = await store.get(key)
            return OK, None if raw is None else int(raw)
        if op.f == "write":
            await store.put(key, str(op.value))
            return OK, op.value
        expected, new = op.value
        return (OK if await store.cas(key, str(expected), str(new)) else FAIL), op.value

    def final_ops(self) -> list[Op]:
        return [Op("read", n) for n in self.used]

    def check(self, events: Sequence[Event]) -> Verdict:
        from kvstore.jepsen.checker import check

        # Every key to the end (not just the first counterexample): runs are small,
        # and the report should list every key that went wrong.
        result = check(pair_events(events), RegisterModel(), stop_at_first_failure=False)
        keys = len(result.partitions)
        bad = [p.key for p in result.failures]
        summary = (f"linearizable ({keys} keys)" if result.ok
                   else f"NOT linearizable: keys {bad} of {keys}")
        return Verdict(result.ok, summary, {
            "checker": result.model_name, "keys": keys, "nonlinearizable_keys": bad,
            "check_seconds": round(result.elapsed, 3), "explanation": result.explain(40)})


# --------------------------------------------------------------------- set

class SetWorkload(Workload):
    """Unique integer adds into a few shard keys, each a JSON list grown by cas.

    A list (not a key per element) is what makes duplicates observable: an add
    applied twice shows up twice. Adds contend on purpose (read, then cas).
    """

    name = "set"
    mutations = frozenset({"add"})

    def __init__(self, seed: int | None = None, shards: int = 4, attempts: int = 8) -> None:
        super().__init__(seed)
        self.shards = shards
        self.attempts = attempts
        self._next = 0

    def key(self, shard: int) -> str:
        return f"{PREFIX}set/{shard}"

    async def setup(self, store: Store) -> None:
        for shard in range(self.shards):
            if await store.get(self.key(shard)) is None:
                await store.put(self.key(shard), "[]")

    def next_op(self) -> Op:
        with self._lock:
            element, self._next = self._next, self._next + 1
        return Op("add", None, element)

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        if op.f == "read":
            return OK, await self._read_all(store)
        key = self.key(op.value % self.shards)
        for _ in range(self.attempts):
            raw = await store.get(key)
            current = json.loads(raw) if raw else []
            if await store.cas(key, raw or "[]", json.dumps(current + [op.value])):
                return OK, op.value
        return FAIL, op.value  # every compare failed: the element was never added

    async def _read_all(self, store: Store) -> list[int]:
        elements: list[int] = []
        for shard in range(self.shards):
            raw = await store.get(self.key(shard))
            elements.extend(json.loads(raw) if raw else [])
        return sorted(elements)

    def final_ops(self) -> list[Op]:
        return [Op("read")]

    def check(self, events: Sequence[Event]) -> Verdict:
        return check_set(pair_events(events))


def check_set(operations: Iterable[Operation]) -> Verdict:
    """Jepsen's set checker: acknowledged adds present once, nothing unexpected."""
    operations = list(operations)
    attempted = {op.value for op in operations if op.f == "add"}
    acked = {op.value for op in operations if op.f == "add" and op.outcome == OK}
    unknown = {op.value for op in operations if op.f == "add" and op.outcome == INFO}
    reads = [op for op in operations if op.f == "read" and op.outcome == OK]
    if not reads:
        return Verdict(False, "no final read succeeded: cannot judge", {"attempted": len(attempted)},
                       unknown=True)
    final = Counter(reads[-1].output or [])
    lost = sorted(acked - set(final))
    duplicated = sorted(e for e, n in final.items() if n > 1)
    unexpected = sorted(set(final) - attempted)
    recovered = sorted(unknown & set(final))
    valid = not (lost or duplicated or unexpected)
    summary = ("all acknowledged adds present, once" if valid else
               f"{len(lost)} lost, {len(duplicated)} duplicated, {len(unexpected)} unexpected")
    return Verdict(valid, summary, {
        "attempted": len(attempted), "acknowledged": len(acked), "unknown_adds": len(unknown),
        "read": sum(final.values()), "lost": lost, "duplicated": duplicated,
        "unexpected": unexpected, "recovered_unknown": len(recovered)})


# -------------------------------------------------------------------- bank

class BankWorkload(Workload):
    """Transfers between accounts; each read is one range (one revision, a snapshot)."""

    name = "bank"
    mutations = frozenset({"transfer"})

    def __init__(self, seed: int | None = None, accounts: int = 5, initial: int = 10,
                 max_amount: int = 5, read_ratio: float = 0.4) -> None:
        super().__init__(seed)
        self.accounts = accounts
        self.initial = initial
        self.max_amount = max_amount
        self.read_ratio = read_ratio

    @property
    def total(self) -> int:
        return self.accounts * self.initial

    def key(self, account: int) -> str:
        return f"{PREFIX}bank/{account}"

    async def setup(self, store: Store) -> None:
        # One atomic step, so a retried setup never mixes old and new balances.
        if not await store.get_prefix(f"{PREFIX}bank/"):
            await store.swap({}, {self.key(a): str(self.initial) for a in range(self.accounts)})

    def next_op(self) -> Op:
        if self.rng.random() < self.read_ratio:
            return Op("read")
        source, target = self.rng.sample(range(self.accounts), 2)
        return Op("transfer", None, {"from": source, "to": target,
                                     "amount": self.rng.randint(1, self.max_amount)})

    async def _balances(self, store: Store) -> dict[str, int]:
        raw = await store.get_prefix(f"{PREFIX}bank/")
        return {k[len(f"{PREFIX}bank/"):]: int(v) for k, v in raw.items()}

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        if op.f == "read":
            return OK, await self._balances(store)
        source, target, amount = op.value["from"], op.value["to"], op.value["amount"]
        balances = await self._balances(store)
        have_from, have_to = balances.get(str(source)), balances.get(str(target))
        if have_from is None or have_to is None or have_from < amount:
            return FAIL, op.value  # nothing sent: certainly did not happen
        done = await store.swap(
            {self.key(source): str(have_from), self.key(target): str(have_to)},
            {self.key(source): str(have_from - amount), self.key(target): str(have_to + amount)})
        return (OK if done else FAIL), op.value

    def final_ops(self) -> list[Op]:
        return [Op("read")]

    def check(self, events: Sequence[Event]) -> Verdict:
        return check_bank(pair_events(events), self.accounts, self.total)


def check_bank(operations: Iterable[Operation], accounts: int, total: int) -> Verdict:
    """Every successful read sees every account, the conserved total, no negative balance."""
    reads = [op for op in operations if op.f == "read" and op.outcome == OK]
    bad = []
    for op in reads:
        balances = op.output or {}
        problems = []
        if len(balances) != accounts:
            problems.append(f"{len(balances)} accounts, expected {accounts}")
        if sum(balances.values()) != total:
            problems.append(f"total {sum(balances.values())}, expected {total}")
        negative = {a: b for a, b in balances.items() if b < 0}
        if negative:
            problems.append(f"negative balances {negative}")
        if problems:
            bad.append({"op": op.index, "balances": balances, "problems": problems})
    if not reads:
        return Verdict(False, "no read succeeded: cannot judge", {}, unknown=True)
    valid = not bad
    summary = (f"{len(reads)} reads, all conserve {total}" if valid
               else f"{len(bad)} of {len(reads)} reads broke the invariants")
    return Verdict(valid, summary, {"reads": len(reads), "bad_reads": len(bad),
                                    "first_bad": bad[:10], "total": total,
                                    "final": reads[-1].output})


# ------------------------------------------------------------------- watch

class WatchWorkload(Workload):
    """Puts of unique values under one prefix, and watches on it that record their streams.

    A watch starts at a revision up to `lookback` below the newest write
    this workload has seen acknowledged (so many start in the past and catch
    up from history), and records up to `max_events` events or `seconds`.
    Failures under it (a killed member, a partition) are the client's to
    resume from; a stream that ends in an error still records what it got.
    Events are [revision, key, value, type].
    """

    name = "watch"
    mutations = frozenset({"write"})

    def __init__(self, seed: int | None = None, keys: int = 8, watch_ratio: float = 0.25,
                 lookback: int = 40, max_events: int = 60, seconds: float = 2.0) -> None:
        super().__init__(seed)
        self.keys = keys
        self.watch_ratio = watch_ratio
        self.lookback = lookback
        self.max_events = max_events
        self.seconds = seconds
        self._next = 0
        self._newest = 0  # the newest acknowledged write's revision

    @property
    def prefix(self) -> str:
        return f"{PREFIX}watch/"

    def next_op(self) -> Op:
        with self._lock:
            if self.rng.random() < self.watch_ratio:
                start = max(1, self._newest + 1 - self.rng.randrange(self.lookback))
                return Op("watch", None, start)
            value, self._next = self._next, self._next + 1
            return Op("write", self.rng.randrange(self.keys), value)

    async def apply(self, store: Store, op: Op) -> tuple[str, Any]:
        if op.f == "write":
            rev = await store.put_revision(f"{self.prefix}{op.key}", str(op.value))
            with self._lock:
                self._newest = max(self._newest, rev)
            return OK, [op.value, rev]
        if op.f == "watch":
            events, ended = await store.watch(self.prefix, op.value, self.max_events, self.seconds)
            return OK, {"start": op.value, "events": events, "ended": ended}
        return OK, await store.history(self.prefix)

    def final_ops(self) -> list[Op]:
        return [Op("history")]

    def check(self, events: Sequence[Event]) -> Verdict:
        return check_watch(pair_events(events), self.prefix)


def check_watch(operations: Iterable[Operation], prefix: str = f"{PREFIX}watch/") -> Verdict:
    """Each stream a slice of the committed history from its start; every acknowledged write in it."""
    operations = list(operations)
    finals = [op for op in operations if op.f == "history" and op.outcome == OK]
    if not finals:
        return Verdict(False, "no final history read succeeded: cannot judge", {}, unknown=True)
    history = [tuple(e) for e in finals[-1].output or []]
    problems: list[dict[str, Any]] = []
    revs = [e[0] for e in history]
    if revs != sorted(set(revs)):
        problems.append({"history": "the final history is not in strictly increasing revision order"})
    by_rev = {e[0]: e for e in history}
    lost = []
    for op in operations:
        if op.f == "write" and op.outcome == OK:
            value, rev = op.output
            e = by_rev.get(rev)
            if e is None or e[2] != str(value):
                lost.append({"op": op.index, "revision": rev, "value": value, "history": e})
    streams = [op for op in operations if op.f == "watch" and op.outcome == OK]
    seen = 0
    for op in streams:
        start, got = op.output["start"], [tuple(e) for e in op.output["events"]]
        seen += len(got)
        expected = [e for e in history if e[0] >= start][:len(got)]
        if got != expected:
            first = next(i for i in range(len(got)) if i >= len(expected) or got[i] != expected[i])
            problems.append({"op": op.index, "start": start, "at": first, "got": got[first:first + 3],
                             "expected": expected[first:first + 3], "ended": op.output.get("ended", "")})
    valid = not problems and not lost
    summary = (f"{len(streams)} streams ({seen} events) are slices of the {len(history)}-event history; "
               f"every acknowledged write is in it" if valid else
               f"{len(problems)} bad streams, {len(lost)} acknowledged writes missing from the history")
    return Verdict(valid, summary, {"streams": len(streams), "events_seen": seen, "history": len(history),
                                    "bad_streams": problems[:10], "lost_writes": lost[:10]})


WORKLOADS: dict[str, type[Workload]] = {
    "register": RegisterWorkload, "set": SetWorkload, "bank": BankWorkload, "watch": WatchWorkload}


def make_workload(name: str, seed: int | None = None) -> Workload:
    if name == "lease":
        from kvstore.jepsen.lease_workload import LeaseWorkload

        return LeaseWorkload(seed)
    if name in ("lock", "lock-unfenced"):  # lock-unfenced: writes without the guard (the checker's teeth)
        from kvstore.jepsen.lock_workload import LockWorkload

        return LockWorkload(seed, fenced=name == "lock")
    try:
        return WORKLOADS[name](seed)
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}, lease") from None


def workload_of(operations: Sequence[Operation]) -> str:
    """Which workload recorded a history, from the functions it uses."""
    functions = {op.f for op in operations}
    if "grant" in functions:
        return "lease"
    if "watch" in functions or "history" in functions:
        return "watch"
    if "inc" in functions:
        return "lock"
    if "add" in functions:
        return "set"
    if "transfer" in functions:
        return "bank"
    return "register"
