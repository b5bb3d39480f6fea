"""Linearizability checking: is there one order of the operations, consistent with
real time, in which the model explains every result?

The search is Wing & Gong's algorithm with Lowe's improvements: the history is a
doubly-linked list of call and return entries in time order. Walking from the
front, a call whose operation the model accepts is linearized: its call and
return entries are lifted out of the list and the walk restarts. Reaching a
return entry means that operation should already have taken effect, so the
search backtracks to the most recent choice. Every (set of linearized
operations, model state) configuration is remembered, and never explored twice.

By P-compositionality (Herlihy & Wing), a history is linearizable exactly when the
sub-history of each independent object (each key) is; partitions are checked
separately, which turns one exponential search into many small ones.

Outcome rules, applied before the search:

- ``ok``: took effect between its invoke and its completion.
- ``info`` (or never completed): unknown. It may take effect at any point after
  its invoke, or never: its return entry sits at +infinity, and linearizing it
  at the very end is the same as never. An unknown read has no effect: dropped.
- ``fail`` on a read: an unknown outcome with no effect: dropped.
- ``fail`` on a cas: a real answer, the compare did not match: checked.
- ``fail`` on anything else (write, put, append): it did not happen: dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.jepsen.history import FAIL, OK, HistoryError, Operation
from kvstore.jepsen.models import KvModel, Model, RegisterModel, State
from kvstore.jepsen.parsers import EDN, detect_format, load_operations

#: the partition key reported when a history is checked as one object.
ALL_KEYS = "(all keys)"

#: how many operations of a long linearizable prefix ``__str__`` shows (the last ones).
PREFIX_SHOWN = 12


@dataclass
class PartitionResult:
    """The verdict for one key's sub-history.

    For a non-linearizable partition, the search's deepest point explains why:
    ``linearized_prefix`` is the longest sequence of operations the model accepted
    (in linearization order), ``state_after_prefix`` the model state after it, and
    ``unlinearizable`` the operations pending there: none of them could be
    linearized next (the model rejects it, or every continuation fails), yet
    ``blocking`` had already returned, so something had to take effect.
    """

    key: Hashable
    ok: bool | None  # None: not finished, the check stopped at another partition's failure
    model: Model
    operations: list[Operation]
    dropped: int
    configurations: int
    elapsed: float
    linearized_prefix: list[Operation] = field(default_factory=list)
    unlinearizable: list[Operation] = field(default_factory=list)
    blocking: Operation | None = None
    state_after_prefix: State = None

    def explain(self, prefix_shown: int | None = None) -> str:
        """A readable account; ``prefix_shown`` limits the prefix to its last N operations."""
        if self.key is None:
            name = "the register"
        elif self.key == ALL_KEYS:
            name = "all keys as one object"
        else:
            name = f"key {self.key!r}"
        if self.ok is None:
            return (f"{name}: not finished ({len(self.operations)} operations, "
                    f"{self.elapsed:.2f} s) — the check stopped before its verdict")
        verdict = "linearizable" if self.ok else "NOT linearizable"
        lines = [f"{name}: {verdict} — {len(self.operations)} operations checked, "
                 f"{self.dropped} dropped, {self.configurations} configurations, "
                 f"{self.elapsed * 1000:.1f} ms"]
        if self.ok:
            return "\n".join(lines)
        prefix = self.linearized_prefix
        shown = prefix if prefix_shown is None else prefix[max(0, len(prefix) - prefix_shown):]
        lines.append(f"  longest linearizable prefix: {len(prefix)} operations")
        if len(shown) < len(prefix):
            lines.append(f"    ... {len(prefix) - len(shown)} earlier operations")
        lines.extend(f"    {op}" for op in shown)
        lines.append(f"  model state after it: {self.model.describe(self.state_after_prefix)}")
        lines.append("  no pending operation can be linearized next:")
        for op in self.unlinearizable:
            legal, after = self.model.step(self.state_after_prefix, op)
            if legal:
                why = (f"allowed (state -> {self.model.describe(after)}), "
                       "but no continuation from there succeeds")
            else:
                why = "impossible in this state"
            lines.append(f"    {op}   {why}")
        if self.blocking is not None:
            lines.append(f"  yet {self.blocking} had already returned, so some operation "
                         "must take effect here")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain(PREFIX_SHOWN)


@dataclass
class CheckResult:
    """The verdict for a whole history: linearizable iff every partition is.

    ``decided`` is False when a time limit ran out first; ``ok`` is then False too,
    as the history was not shown linearizable.
    """

    ok: bool
    model_name: str
    partitions: list[PartitionResult]
    elapsed: float
    source: str | None = None
    decided: bool = True

    @property
    def failures(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.ok is False]

    def explain(self, prefix_shown: int | None = None) -> str:
        """Verdict, then every failing partition explained (all of them if linearizable)."""
        operations = sum(len(p.operations) for p in self.partitions)
        where = f"{self.source}: " if self.source else ""
        if not self.decided:
            verdict = "UNDECIDED (time limit reached)"
        else:
            verdict = "linearizable" if self.ok else "NOT linearizable"
        lines = [f"{where}{verdict} as a {self.model_name} — {operations} operations in "
                 f"{len(self.partitions)} partition(s), {self.elapsed:.3f} s"]
        if self.ok:
            shown = self.partitions
        elif self.decided:
            shown = self.failures
        else:
            shown = [p for p in self.partitions if p.ok is not True]
        lines.extend(p.explain(prefix_shown) for p in shown)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain(PREFIX_SHOWN)


# ------------------------------------------------------------------ preparation

def relevant_operations(operations: Iterable[Operation], model: Model) -> list[Operation]:
    """The operations that constrain the search (see the outcome rules above)."""
    kept = []
    for op in operations:
        if op.outcome != OK:
            if op.f in model.read_functions:
                continue  # failed or unknown read: no effect, no information
            if op.outcome == FAIL and op.f not in model.definite_fail_functions:
                continue  # a failed write certainly did not happen
        if op.complete_time is not None and op.complete_time < op.invoke_time:
            raise HistoryError(f"{op} completes before it is invoked")
        kept.append(op)
    return kept


def partition(operations: Sequence[Operation], model: Model) -> dict[Hashable, list[Operation]]:
    """Operations grouped by the model's partition key, each group in history order."""
    groups: dict[Hashable, list[Operation]] = {}
    for op in operations:
        groups.setdefault(model.partition_key(op), []).append(op)
    return groups


# ------------------------------------------------------------------ the search

#: search iterations between two yields, so partitions can take turns.
SLICE = 2048


@dataclass
class _SearchOutcome:
    ok: bool
    configurations: int
    prefix: list[int]
    pending: list[int]
    blocking: int | None
    state: State


def _search(ops: Sequence[Operation], model: Model, memoize: bool = True,
            reads_first: bool = True) -> Generator[None, None, _SearchOutcome]:
    """Wing & Gong / Lowe search over one partition; ``ops`` are numbered by position.

    A generator: it yields every ``SLICE`` iterations so that several partitions can
    be searched in turns, and returns the outcome.

    ``reads_first``: a read that can be linearized now is linearized now and never
    reconsidered. That is sound: a read leaves the state alone, so in any
    linearization that places it later it can be moved here (everything that had
    to precede it is already linearized). It spares the search from trying every
    position of every read when a history is not linearizable.
    """
    count = len(ops)
    # Entry 0 is the head sentinel, 1..2n the calls and returns in time order (a call
    # before a return at the same instant: they overlap), 2n+1 the tail sentinel.
    timeline = sorted([(op.invoke_time, 0, i) for i, op in enumerate(ops)]
                      + [(op.return_time, 1, i) for i, op in enumerate(ops)])
    size = 2 * count + 2
    head, tail = 0, size - 1
    nxt = list(range(1, size + 1))
    prv = list(range(-1, size - 1))
    op_at = [0] * size           # which operation an entry belongs to
    return_of = [0] * size       # for a call entry: its return entry; 0 for returns
    call_entry = [0] * count
    for entry, (_, is_return, i) in enumerate(timeline, start=1):
        op_at[entry] = i
        if is_return:
            return_of[call_entry[i]] = entry
        else:
            call_entry[i] = entry
    bit = [1 << i for i in range(count)]
    is_read = [reads_first and op.f in model.read_functions for op in ops]
    is_open = [op.return_time == math.inf for op in ops]

    step = model.step
    seen: set[tuple[int, State]] = set()
    stack: list[tuple[int, State, bool]] = []  # (call entry linearized, state before, was a read)
    state = model.init()
    linearized = 0
    iterations = 0
    deepest = -1
    outcome = _SearchOutcome(ok=True, configurations=0, prefix=[], pending=[], blocking=None,
                             state=state)

    # Candidates are the calls before the first return entry. They are tried in two
    # passes: first the operations that completed, then the open ones (unknown
    # outcome), which could as well take effect later or never. The order changes
    # nothing in what is explored before a "no", only how soon a "yes" is found.
    open_pass = False
    entry = nxt[head]
    while nxt[head] != tail:
        iterations += 1
        if not iterations % SLICE:
            yield
        ret = return_of[entry]
        if ret:  # a call: try to linearize it now
            i = op_at[entry]
            if is_open[i] != open_pass:
                entry = nxt[entry]
                continue
            legal, next_state = step(state, ops[i])
            if not legal:
                entry = nxt[entry]
                continue
            next_linearized = linearized | bit[i]
            if memoize:
                configuration = (next_linearized, next_state)
                if configuration in seen:  # explored before, and it led nowhere
                    if not is_read[i]:
                        entry = nxt[entry]
                        continue
                    # ... and the read could go first, so this configuration fails too.
                    ret = 0
                else:
                    seen.add(configuration)
            if ret:
                stack.append((entry, state, is_read[i]))
                state, linearized = next_state, next_linearized
                before, after = prv[entry], nxt[entry]  # lift the call ...
                nxt[before], prv[after] = after, before
                before, after = prv[ret], nxt[ret]      # ... and its return
                nxt[before], prv[after] = after, before
                entry, open_pass = nxt[head], False
                continue
        elif not open_pass:
            entry, open_pass = nxt[head], True  # now try the open operations
            continue
        elif len(stack) > deepest:
            # A return: its operation should have taken effect, and no call before it
            # could. Remember the deepest such point: it explains a failure.
            deepest = len(stack)
            outcome.prefix = [op_at[e] for e, _, _ in stack]
            pending, cursor = [], nxt[head]
            while cursor != entry:
                pending.append(op_at[cursor])
                cursor = nxt[cursor]
            outcome.pending, outcome.blocking, outcome.state = pending, op_at[entry], state
        # Backtrack: undo the latest choice and try the next candidate after it;
        # a read that was linearized first has no alternative worth trying.
        while True:
            if not stack:
                outcome.ok = False
                outcome.configurations = len(seen) if memoize else iterations
                return outcome
            entry, state, was_read = stack.pop()
            ret = return_of[entry]
            linearized ^= bit[op_at[entry]]
            before, after = prv[ret], nxt[ret]  # put the return back ...
            nxt[before] = prv[after] = ret
            before, after = prv[entry], nxt[entry]  # ... then the call
            nxt[before] = prv[after] = entry
            if not was_read:
                break
        entry, open_pass = nxt[entry], is_open[op_at[entry]]
    outcome.configurations = len(seen) if memoize else iterations
    outcome.prefix, outcome.pending, outcome.blocking = [], [], None
    return outcome


def _run(search: Generator[None, None, _SearchOutcome]) -> _SearchOutcome:
    """Drive one search to its end."""
    while True:
        try:
            next(search)
        except StopIteration as finished:
            return finished.value


# ------------------------------------------------------------------ entry points

def _partition_result(key: Hashable, operations: Sequence[Operation], model: Model,
                      dropped: int, found: _SearchOutcome | None,
                      elapsed: float) -> PartitionResult:
    if found is None:
        return PartitionResult(key=key, ok=None, model=model, operations=list(operations),
                               dropped=dropped, configurations=0, elapsed=elapsed)
    return PartitionResult(
        key=key, ok=found.ok, model=model, operations=list(operations), dropped=dropped,
        configurations=found.configurations, elapsed=elapsed,
        linearized_prefix=[operations[i] for i in found.prefix],
        unlinearizable=[operations[i] for i in found.pending],
        blocking=None if found.blocking is None else operations[found.blocking],
        state_after_prefix=found.state)


def check_partition(key: Hashable, operations: Sequence[Operation], model: Model,
                    dropped: int = 0, memoize: bool = True,
                    reads_first: bool = True) -> PartitionResult:
    """Check one independent sub-history to the end."""
    started = time.perf_counter()
    found = _run(_search(operations, model, memoize, reads_first))
    return _partition_result(key, operations, model, dropped, found,
                             time.perf_counter() - started)


def check(operations: Iterable[Operation], model: Model, *, partitioned: bool = True,
          memoize: bool = True, reads_first: bool = True, stop_at_first_failure: bool = True,
          time_limit: float | None = None, source: str | None = None) -> CheckResult:
    """Is this history linearizable with respect to ``model``?

    Partitions are searched in turns, a slice each, so one hard partition does not
    hold up the others. With ``stop_at_first_failure`` the check ends as soon as
    one partition is shown not linearizable (one counterexample proves the
    verdict); the partitions left unfinished report ``ok=None``.

    ``time_limit`` (seconds) bounds an exponential search: when it runs out before a
    verdict, the result has ``decided=False`` and ``ok=False`` (not shown
    linearizable), and the unfinished partitions report ``ok=None``.

    ``partitioned=False``, ``memoize=False`` and ``reads_first=False`` switch off
    P-compositionality, the configuration cache and the read reduction; they
    exist to show that the verdict does not depend on them (they only save time).
    """
    started = time.perf_counter()
    everything = list(operations)
    relevant = relevant_operations(everything, model)
    all_groups = partition(everything, model)
    if partitioned:
        groups = partition(relevant, model)
    else:
        if model.per_key and len(all_groups) > 1:
            raise HistoryError(f"a {model.name} describes one key; this history names "
                               f"{len(all_groups)}: check it partitioned")
        groups = {next(iter(all_groups)) if len(all_groups) == 1 else ALL_KEYS: relevant}

    keys = list(groups)
    models = {key: model.for_partition(key) if partitioned else model for key in keys}
    searches = {key: _search(groups[key], models[key], memoize, reads_first) for key in keys}
    found: dict[Hashable, _SearchOutcome] = {}
    elapsed = dict.fromkeys(keys, 0.0)
    failed = out_of_time = False
    deadline = math.inf if time_limit is None else started + time_limit
    while searches and not (failed and stop_at_first_failure) and not out_of_time:
        for key, search in list(searches.items()):
            slice_started = time.perf_counter()
            try:
                next(search)
            except StopIteration as finished:
                found[key] = finished.value
                del searches[key]
                failed = failed or not finished.value.ok
            elapsed[key] += time.perf_counter() - slice_started
            if failed and stop_at_first_failure:
                break
            if time.perf_counter() > deadline:
                out_of_time = True
                break
    for search in searches.values():
        search.close()

    results = []
    for key in keys:
        dropped = (len(all_groups.get(key, ())) if partitioned else len(everything)) - len(groups[key])
        results.append(_partition_result(key, groups[key], models[key], dropped, found.get(key),
                                         elapsed[key]))
    decided = failed or not searches
    return CheckResult(ok=decided and not failed, model_name=model.name, partitions=results,
                       elapsed=time.perf_counter() - started, source=source, decided=decided)


def choose_model(operations: Sequence[Operation], fmt: str) -> Model:
    """The model a history's functions call for: a kv map if it uses get/put/append."""
    functions = {op.f for op in operations}
    if functions & {"get", "put", "append"}:
        # The EDN reference histories read an absent key as the empty string.
        return KvModel(missing="" if fmt == EDN else None)
    return RegisterModel()


def check_file(path: str | Path, model: Model | None = None, **options: Any) -> CheckResult:
    """Check a history file in any supported format (JSONL, etcd log, EDN)."""
    fmt = detect_format(path)
    operations = load_operations(path, fmt)
    return check(operations, model or choose_model(operations, fmt), source=str(path), **options)
