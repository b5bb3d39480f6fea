"""The linearizability checker: reference histories with known verdicts, hand-written
histories for each outcome rule, and evidence that it can say "no"."""

from __future__ import annotations

import itertools
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.jepsen.checker import CheckResult, check, check_file
from kvstore.jepsen.history import (
    Event,
    HistoryError,
    Operation,
    load_jsonl,
    pair_events,
    write_jsonl_events,
)
from kvstore.jepsen.models import KvModel, Model, RegisterModel, State
from kvstore.jepsen.parsers import (
    EDN,
    ETCD_LOG,
    JSONL,
    Keyword,
    detect_format,
    load_operations,
    parse_edn_value,
    read_edn_events,
    read_etcd_log_events,
    read_verdicts,
)

HISTORIES = Path(__file__).resolve().parents[2].parent / "shared" / "histories"


def ops(*rows: tuple[Any, ...]) -> list[Operation]:
    """Operations from (process, type, f, value[, key]) rows, one event per row, in time order."""
    events = [Event(process=row[0], type=row[1], f=row[2], value=row[3],
                    key=row[4] if len(row) > 4 else None, time=t)
              for t, row in enumerate(rows)]
    return pair_events(events)


def linearizable(history: list[Operation], model: Model | None = None, **options: bool) -> bool:
    return check(history, model or RegisterModel(), **options).ok


# ------------------------------------------------------------ reference histories

def _reference_dir(name: str) -> Path:
    folder = HISTORIES / name
    if not folder.is_dir():
        pytest.skip(f"reference histories not found at {folder} "
                    "(they sit beside the checkout in CI; see DESIGN.md)")
    return folder


def _check_reference_folder(folder: Path, expected_count: int) -> tuple[float, str, float]:
    verdicts = read_verdicts(folder / "VERDICTS")
    assert len(verdicts) == expected_count
    mismatches, worst, worst_time = [], "", 0.0
    started = time.perf_counter()
    for path in sorted(folder.iterdir()):
        if path.name in ("VERDICTS",) or path.suffix == ".md":
            continue
        file_started = time.perf_counter()
        result = check_file(path)
        spent = time.perf_counter() - file_started
        if spent > worst_time:
            worst, worst_time = path.name, spent
        if path.name not in verdicts:
            # etcd_095.log: an empty run, no verdict recorded; nothing happened, so nothing is wrong.
            assert path.stat().st_size == 0, f"{path.name} has no verdict"
            assert result.ok and not result.partitions
            continue
        if result.ok != verdicts.pop(path.name):
            mismatches.append(f"{path.name}: expected {'' if result.ok else 'not '}"
                              f"linearizable\n{result}")
    assert not verdicts, f"VERDICTS names missing files: {sorted(verdicts)}"
    assert not mismatches, "\n".join(mismatches)
    return time.perf_counter() - started, worst, worst_time


@pytest.mark.parametrize("folder, count", [("etcd-jepsen", 102), ("kv", 6)])
def test_reference_histories_match_their_verdicts(folder: str, count: int,
                                                  record_property: Any) -> None:
    total, worst, worst_time = _check_reference_folder(_reference_dir(folder), count)
    summary = f"{folder}: {count} verdicts in {total:.2f} s, worst {worst} {worst_time:.2f} s"
    print(summary)
    record_property("checker_time", summary)
    assert total < 60, summary


def test_reference_failure_is_explained() -> None:
    result = check_file(_reference_dir("etcd-jepsen") / "etcd_000.log")
    assert not result.ok
    failing = result.failures[0]
    assert failing.unlinearizable and failing.blocking is not None
    assert len(failing.linearized_prefix) > 0
    text = str(result)
    assert "NOT linearizable" in text and "longest linearizable prefix" in text


def test_every_partition_is_checked_when_asked() -> None:
    result = check_file(_reference_dir("kv") / "c10-bad.txt", stop_at_first_failure=False)
    assert not result.ok
    assert all(p.ok is not None for p in result.partitions)
    assert len(result.failures) >= 1


# ------------------------------------------------------------ parsers and history

def test_etcd_log_lines_with_tabs_or_spaces() -> None:
    lines = ["INFO  jepsen.util - 3\t:invoke\t:cas\t[1 2]",
             "INFO  jepsen.util - 3   :fail   :cas    [1 2]",
             "INFO  jepsen.util - 4 :invoke :read nil",
             "INFO  jepsen.util - 4 :info :read :timed-out",
             "some unrelated log line"]
    events = list(read_etcd_log_events(lines))
    assert [(e.process, e.type, e.f, e.value) for e in events] == [
        (3, "invoke", "cas", (1, 2)), (3, "fail", "cas", (1, 2)),
        (4, "invoke", "read", None), (4, "info", "read", Keyword("timed-out"))]


def test_edn_lines() -> None:
    line = '{:process 0, :type :invoke, :f :append, :key "0", :value "x 0 0 y"}'
    (event,) = read_edn_events([line])
    assert (event.process, event.type, event.f, event.key, event.value) == (
        0, "invoke", "append", "0", "x 0 0 y")
    assert parse_edn_value('[1 "a\\"b" nil :k 2.5]') == (1, 'a"b', None, Keyword("k"), 2.5)
    assert Keyword("x") != "x"


def test_jsonl_round_trip_and_format_detection(tmp_path: Path) -> None:
    events = [Event(0, "invoke", "cas", "k", (1, 2), 10), Event(1, "invoke", "get", "k", None, 11),
              Event(0, "fail", "cas", "k", (1, 2), 12), Event(1, "ok", "get", "k", None, 13)]
    path = tmp_path / "history.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        write_jsonl_events(events, out)
    loaded = load_jsonl(path)
    assert [(o.f, o.value, o.outcome, o.invoke_time, o.complete_time) for o in loaded] == [
        ("cas", (1, 2), "fail", 10, 12), ("get", None, "ok", 11, 13)]
    assert detect_format(path) == JSONL
    assert check_file(path).ok

    etcd = tmp_path / "etcd.log"
    etcd.write_text("INFO  jepsen.util - 0\t:invoke\t:read\tnil\nINFO  jepsen.util - 0\t:ok\t:read\t3\n")
    assert detect_format(etcd) == ETCD_LOG
    assert not check_file(etcd).ok  # the register starts as nil
    edn = tmp_path / "kv.edn"
    edn.write_text('{:process 0, :type :invoke, :f :get, :key "a", :value nil}\n'
                   '{:process 0, :type :ok, :f :get, :key "a", :value ""}\n')
    assert detect_format(edn) == EDN
    assert check_file(edn).ok  # an absent key reads as "" in this format


def test_unmatched_invoke_is_info_and_stray_completion_is_an_error() -> None:
    (op,) = ops((0, "invoke", "write", 1))
    assert op.outcome == "info" and op.complete_time is None and op.return_time == math.inf
    with pytest.raises(HistoryError):
        ops((0, "ok", "write", 1))
    with pytest.raises(HistoryError):
        ops((0, "invoke", "write", 1), (0, "ok", "read", 1))


def test_verdicts_file_format(tmp_path: Path) -> None:
    path = tmp_path / "VERDICTS"
    path.write_text("a.log linearizable\nb.log not-linearizable\n\n")
    assert read_verdicts(path) == {"a.log": True, "b.log": False}
    path.write_text("a.log maybe\n")
    with pytest.raises(ValueError):
        read_verdicts(path)


# ------------------------------------------------------------ register semantics

WRITE_THEN_READ = ops((0, "invoke", "write", 1), (0, "ok", "write", 1),
                      (1, "invoke", "read", None), (1, "ok", "read", 1))
STALE_READ = ops((0, "invoke", "write", 1), (0, "ok", "write", 1),
                 (0, "invoke", "write", 2), (0, "ok", "write", 2),
                 (1, "invoke", "read", None), (1, "ok", "read", 1))


def test_sequential_write_then_read() -> None:
    assert linearizable(WRITE_THEN_READ)
    assert not linearizable(ops((1, "invoke", "read", None), (1, "ok", "read", 1)))  # starts nil


def test_stale_read_is_caught_and_explained() -> None:
    result = check(STALE_READ, RegisterModel())
    assert not result.ok
    failing = result.failures[0]
    assert [op.value for op in failing.linearized_prefix] == [1, 2]
    assert failing.state_after_prefix == 2
    assert [op.f for op in failing.unlinearizable] == ["read"]
    assert failing.blocking is failing.unlinearizable[0]
    assert "impossible in this state" in result.explain()


@pytest.mark.parametrize("observed", [1, 2])
def test_concurrent_writes_linearize_in_either_order(observed: int) -> None:
    history = ops((0, "invoke", "write", 1), (1, "invoke", "write", 2),
                  (0, "ok", "write", 1), (1, "ok", "write", 2),
                  (2, "invoke", "read", None), (2, "ok", "read", observed))
    assert linearizable(history)


@pytest.mark.parametrize("observed", [None, 1])
def test_read_concurrent_with_a_write_sees_before_or_after(observed: int | None) -> None:
    history = ops((0, "invoke", "write", 1), (1, "invoke", "read", None),
                  (1, "ok", "read", observed), (0, "ok", "write", 1))
    assert linearizable(history)


@pytest.mark.parametrize("completion", ["info", None])
def test_unknown_write_may_apply_or_not(completion: str | None) -> None:
    def history(*reads: int | None) -> list[Operation]:
        rows: list[tuple[Any, ...]] = [(0, "invoke", "write", 1)]
        if completion:
            rows.append((0, completion, "write", Keyword("timed-out")))
        for process, value in enumerate(reads, start=1):
            rows += [(process, "invoke", "read", None), (process, "ok", "read", value)]
        return ops(*rows)

    assert linearizable(history(1))          # it happened
    assert linearizable(history(None))       # it never happened
    assert linearizable(history(None, 1))    # it happened late
    assert not linearizable(history(1, None))  # once seen, it cannot be undone


def test_failed_write_did_not_happen() -> None:
    failed = [(0, "invoke", "write", 1), (0, "fail", "write", 1),
              (1, "invoke", "read", None)]
    assert linearizable(ops(*failed, (1, "ok", "read", None)))
    assert not linearizable(ops(*failed, (1, "ok", "read", 1)))


def test_failed_cas_means_the_compare_did_not_match() -> None:
    written = [(0, "invoke", "write", 1), (0, "ok", "write", 1)]
    assert linearizable(ops(*written, (1, "invoke", "cas", (3, 2)), (1, "fail", "cas", (3, 2)),
                            (1, "invoke", "read", None), (1, "ok", "read", 1)))
    # the register held 1, so a cas from 1 could not have failed
    assert not linearizable(ops(*written, (1, "invoke", "cas", (1, 2)),
                                (1, "fail", "cas", (1, 2))))


def test_successful_cas() -> None:
    written = [(0, "invoke", "write", 1), (0, "ok", "write", 1)]
    assert linearizable(ops(*written, (1, "invoke", "cas", (1, 2)), (1, "ok", "cas", (1, 2)),
                            (1, "invoke", "read", None), (1, "ok", "read", 2)))
    assert not linearizable(ops(*written, (1, "invoke", "cas", (5, 2)), (1, "ok", "cas", (5, 2))))


@pytest.mark.parametrize("observed, expected", [(1, True), (2, True), (3, False)])
def test_unknown_cas_may_apply_or_not(observed: int, expected: bool) -> None:
    history = ops((0, "invoke", "write", 1), (0, "ok", "write", 1),
                  (1, "invoke", "cas", (1, 2)), (1, "info", "cas", Keyword("timed-out")),
                  (2, "invoke", "read", None), (2, "ok", "read", observed))
    assert linearizable(history) is expected


@pytest.mark.parametrize("outcome", ["fail", "info"])
def test_failed_or_unknown_reads_are_dropped(outcome: str) -> None:
    history = ops((1, "invoke", "read", None), (1, outcome, "read", 42), *[
        (0, "invoke", "write", 1), (0, "ok", "write", 1)])
    result = check(history, RegisterModel())
    assert result.ok and result.partitions[0].dropped == 1


# ------------------------------------------------------------ kv map semantics

def kv_ops(*rows: tuple[Any, str, str, str, Any]) -> list[Operation]:
    """Operations from (process, type, f, key, value) rows."""
    return ops(*[(p, t, f, v, k) for p, t, f, k, v in rows])


def test_kv_put_get_append_per_key() -> None:
    history = kv_ops((0, "invoke", "put", "a", "x"), (0, "ok", "put", "a", "x"),
                     (0, "invoke", "append", "a", "y"), (0, "ok", "append", "a", "y"),
                     (1, "invoke", "append", "b", "z"), (1, "ok", "append", "b", "z"),
                     (2, "invoke", "get", "a", None), (2, "ok", "get", "a", "xy"),
                     (2, "invoke", "get", "b", None), (2, "ok", "get", "b", "z"),
                     (2, "invoke", "get", "c", None), (2, "ok", "get", "c", None))
    result = check(history, KvModel())
    assert result.ok and len(result.partitions) == 3
    assert not check(history, KvModel(missing="")).ok  # key "c" would have read ""


def test_kv_stale_read_on_one_key_is_blamed_on_that_key() -> None:
    history = kv_ops((0, "invoke", "put", "a", "1"), (0, "ok", "put", "a", "1"),
                     (0, "invoke", "put", "b", "1"), (0, "ok", "put", "b", "1"),
                     (0, "invoke", "put", "b", "2"), (0, "ok", "put", "b", "2"),
                     (1, "invoke", "get", "a", None), (1, "ok", "get", "a", "1"),
                     (1, "invoke", "get", "b", None), (1, "ok", "get", "b", "1"))
    result = check(history, KvModel(), stop_at_first_failure=False)
    assert not result.ok
    assert [p.key for p in result.failures] == ["b"]
    assert "key 'b': NOT linearizable" in str(result)
    assert not check(history, KvModel(), partitioned=False).ok


def test_kv_cas_and_failed_put() -> None:
    base = [(0, "invoke", "put", "k", "1"), (0, "ok", "put", "k", "1"),
            (1, "invoke", "put", "k", "9"), (1, "fail", "put", "k", "9"),
            (0, "invoke", "cas", "k", ("1", "2")), (0, "ok", "cas", "k", ("1", "2")),
            (0, "invoke", "cas", "k", ("1", "3")), (0, "fail", "cas", "k", ("1", "3"))]
    assert check(kv_ops(*base, (2, "invoke", "get", "k", None), (2, "ok", "get", "k", "2")),
                 KvModel()).ok
    assert not check(kv_ops(*base, (2, "invoke", "get", "k", None), (2, "ok", "get", "k", "9")),
                     KvModel()).ok


def test_register_history_with_several_keys_must_be_partitioned() -> None:
    history = kv_ops((0, "invoke", "write", "a", 1), (0, "ok", "write", "a", 1),
                     (0, "invoke", "read", "b", None), (0, "ok", "read", "b", None))
    assert check(history, RegisterModel()).ok
    with pytest.raises(HistoryError):
        check(history, RegisterModel(), partitioned=False)


# ------------------------------------------------------------ teeth

SMALL_HISTORIES = [WRITE_THEN_READ, STALE_READ]


def _brute_force_linearizable(history: list[Operation], model: Model) -> bool:
    """Try every order of every subset of open operations: the definition, slowly."""
    relevant = [op for op in history
                if not (op.outcome != "ok" and op.f in model.read_functions)
                and not (op.outcome == "fail" and op.f not in model.definite_fail_functions)]
    required = [op for op in relevant if op.return_time != math.inf]
    optional = [op for op in relevant if op.return_time == math.inf]
    for size in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, size):
            for order in itertools.permutations(required + list(chosen)):
                if _respects_real_time(order) and _legal(order, model):
                    return True
    return False


def _respects_real_time(order: tuple[Operation, ...]) -> bool:
    return all(not (later.return_time < earlier.invoke_time)
               for position, earlier in enumerate(order) for later in order[position + 1:])


def _legal(order: tuple[Operation, ...], model: Model) -> bool:
    state: State = model.init()
    for op in order:
        legal, state = model.step(state, op)
        if not legal:
            return False
    return True


def _random_register_history(rng: random.Random, size: int) -> list[Operation]:
    """A few processes issuing random calls with random outcomes and overlaps."""
    events: list[Event] = []
    open_calls: dict[int, tuple[str, Any]] = {}
    clock = 0
    while len(events) < 2 * size or open_calls:
        clock += 1
        process = rng.randrange(3)
        if process in open_calls:
            f, value = open_calls.pop(process)
            outcome = rng.choice(["ok", "ok", "ok", "fail", "info"])
            if f == "read":
                value = rng.choice([None, 1, 2])
            events.append(Event(process, outcome, f, None, value, clock))
        elif len(events) < 2 * size:
            f = rng.choice(["read", "write", "cas"])
            value = {"read": None, "write": rng.choice([1, 2]),
                     "cas": (rng.choice([None, 1, 2]), rng.choice([1, 2]))}[f]
            open_calls[process] = (f, value)
            events.append(Event(process, "invoke", f, None, value, clock))
    return pair_events(events)


def test_checker_agrees_with_brute_force_on_random_small_histories() -> None:
    rng = random.Random(6)
    verdicts = []
    for _ in range(300):
        history = _random_register_history(rng, rng.randint(2, 5))
        expected = _brute_force_linearizable(history, RegisterModel())
        for options in ({}, {"memoize": False}, {"reads_first": False}, {"partitioned": False}):
            assert linearizable(history, **options) is expected, (options, history)
        verdicts.append(expected)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8  # both verdicts are exercised


@pytest.mark.parametrize("options", [{"memoize": False}, {"partitioned": False},
                                     {"reads_first": False},
                                     {"memoize": False, "partitioned": False}])
def test_verdicts_do_not_depend_on_the_optimisations(options: dict[str, bool]) -> None:
    for history in SMALL_HISTORIES:
        assert linearizable(history, **options) is linearizable(history)
    kv = [(0, "invoke", "append", "a", "x"), (1, "invoke", "append", "a", "y"),
          (0, "ok", "append", "a", "x"), (1, "ok", "append", "a", "y"),
          (2, "invoke", "put", "b", "z"), (2, "ok", "put", "b", "z"),
          (2, "invoke", "get", "a", None)]
    for observed, expected in (("xy", True), ("yx", True), ("x", False)):
        history = kv_ops(*kv, (2, "ok", "get", "a", observed))
        assert check(history, KvModel(), **options).ok is expected


class RegisterIgnoringWrites(RegisterModel):
    """A deliberately wrong model: writes do nothing."""

    name = "broken-register"

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        if op.f == "write":
            return True, state
        return super().step(state, op)


def test_a_wrong_model_fails_a_linearizable_history() -> None:
    assert linearizable(WRITE_THEN_READ)
    assert not linearizable(WRITE_THEN_READ, RegisterIgnoringWrites())
    folder = HISTORIES / "etcd-jepsen"
    if folder.is_dir():
        verdicts = read_verdicts(folder / "VERDICTS")
        good = [name for name, ok in sorted(verdicts.items()) if ok][:5]
        for name in good:
            history = load_operations(folder / name)
            assert check(history, RegisterModel()).ok
            assert not check(history, RegisterIgnoringWrites()).ok, name


def test_result_reads_well() -> None:
    result: CheckResult = check(WRITE_THEN_READ, RegisterModel())
    assert str(result).startswith("linearizable as a cas-register")
    assert "model state after it: 2" in str(check(STALE_READ, RegisterModel()))


def test_time_limit_leaves_the_verdict_undecided() -> None:
    writers = range(10)
    history = ops(*[(p, "invoke", "write", p) for p in writers],
                  *[(p, "ok", "write", p) for p in writers],
                  (99, "invoke", "read", None), (99, "ok", "read", 42))
    full = check(history, RegisterModel())
    assert full.decided and not full.ok
    cut = check(history, RegisterModel(), time_limit=0)
    assert not cut.decided and not cut.ok
    assert cut.partitions[0].ok is None
    assert "UNDECIDED" in str(cut)


def test_all_partitions_of_a_bad_history_within_a_time_limit() -> None:
    result = check_file(_reference_dir("kv") / "c50-bad.txt", stop_at_first_failure=False,
                        time_limit=2)
    assert not result.ok and result.decided  # a counterexample settles it
    assert len(result.failures) >= 1
