"""The watch workload's checker: a stream must be a gap-free, duplicate-free, ordered slice of the
committed history from its start revision, and every acknowledged write must be in that history."""
from __future__ import annotations

from kvstore.jepsen.history import FAIL, INFO, OK, pair_events
from kvstore.jepsen.recorder import Recorder
from kvstore.jepsen.workloads import check_watch

P = "jepsen/watch/"
HISTORY = [[r, f"{P}{r % 3}", str(r), "PUT"] for r in range(1, 11)]


def verdict(streams, writes=((3, 3, OK),), history=HISTORY):
    rec = Recorder()
    proc = 0
    for value, rev, outcome in writes:
        rec.invoke(proc, "write", 0, value)
        rec.complete(proc, outcome, [value, rev] if outcome == OK else value)
        proc += 1
    for start, events in streams:
        rec.invoke(proc, "watch", None, start)
        rec.complete(proc, OK, {"start": start, "events": events, "ended": ""})
        proc += 1
    rec.invoke(proc, "history")
    rec.complete(proc, OK, history)
    return check_watch(pair_events(rec.events))


def test_slices_of_the_history_are_valid():
    v = verdict([(1, HISTORY[:4]), (5, HISTORY[4:]), (9, []), (11, [])])
    assert v.valid, v.details
    assert v.details["streams"] == 4 and v.details["events_seen"] == 10


def test_a_gap_a_duplicate_a_reorder_or_a_late_start_is_caught():
    gap = HISTORY[2:3] + HISTORY[4:6]
    dup = HISTORY[2:4] + HISTORY[3:5]
    swapped = [HISTORY[3], HISTORY[2]]
    late = HISTORY[4:6]  # asked for revision 3, got 5 first
    for start, stream in ((3, gap), (3, dup), (3, swapped), (3, late)):
        v = verdict([(start, stream)])
        assert not v.valid and v.details["bad_streams"][0]["start"] == start, stream


def test_a_wrong_value_or_an_event_not_in_the_history_is_caught():
    changed = [list(HISTORY[1]), list(HISTORY[2])]
    changed[1][2] = "other"
    assert not verdict([(2, changed)]).valid
    assert not verdict([(10, [HISTORY[9], [11, f"{P}0", "11", "PUT"]])]).valid


def test_a_lost_acknowledged_write_is_caught_and_unknown_writes_are_not():
    v = verdict([], writes=((3, 3, OK), (99, 12, OK), (7, 0, INFO), (8, 0, FAIL)))
    assert not v.valid and v.details["lost_writes"][0]["revision"] == 12


def test_no_final_history_cannot_be_judged():
    rec = Recorder()
    rec.invoke(0, "history")
    rec.complete(0, FAIL)
    v = check_watch(pair_events(rec.events))
    assert v.unknown and not v.valid
