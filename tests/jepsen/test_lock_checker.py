"""The lock checker on hand-made histories: lost increments and stale tokens are caught."""
from __future__ import annotations

from kvstore.jepsen.history import Operation
from kvstore.jepsen.lock_workload import check_lock, parse_counter


def ops(*items):
    """(f, outcome, output) items -> operations."""
    return [Operation(i, 0, f, None, None, out, outcome, i, i + 1) for i, (f, outcome, out) in enumerate(items)]


def test_parse_counter():
    assert parse_counter(None) == (0, 0) and parse_counter("7 123") == (7, 123)


def test_fenced_increments_in_token_order_are_valid():
    v = check_lock(ops(("inc", "ok", [1, 10]), ("inc", "fail", {"hold": 0.1, "refused": "fence"}), ("inc", "ok", [2, 14]),
                       ("inc", "info", 0.2), ("inc", "ok", [3, 20]), ("read", "ok", [4, 25])))
    assert v.valid, v.summary
    assert v.details["acknowledged"] == 3 and v.details["unknown"] == 1


def test_a_count_written_twice_is_a_lost_increment():
    v = check_lock(ops(("inc", "ok", [1, 10]), ("inc", "ok", [1, 14]), ("read", "ok", [1, 14])))
    assert not v.valid and "lost increments" in v.summary and "final count 1 < 2" in v.summary


def test_a_stale_token_accepted_after_its_successor_is_caught():
    v = check_lock(ops(("inc", "ok", [1, 14]), ("inc", "ok", [2, 10]), ("read", "ok", [2, 10])))
    assert not v.valid and "stale token" in v.summary


def test_more_increments_than_could_have_happened_and_no_final_read():
    v = check_lock(ops(("inc", "ok", [1, 10]), ("read", "ok", [3, 12])))
    assert not v.valid and "> 1 acknowledged + 0 unknown" in v.summary
    assert check_lock(ops(("inc", "ok", [1, 10]))).unknown
