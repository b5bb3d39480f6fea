"""Hash barriers and alarms in the state machine, and the majority rule that names a corrupt member."""
from __future__ import annotations

import pytest

from kvstore.server.corruption import differing
from kvstore.storage import alarms
from kvstore.storage.hash_kv import HashMark
from kvstore.storage.state_machine import HASHES_KEPT, StateMachine
from kvstore.v1 import command_pb2, kv_pb2


def put(k: bytes, v: bytes = b"v") -> bytes:
    return command_pb2.Command(ops=[kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v))],
                               leader_clock_ms=1000).SerializeToString()


BARRIER = command_pb2.Command(hash_barrier=True, leader_clock_ms=1000).SerializeToString()


def alarm(member: int, activate: bool = True, name: str = alarms.CORRUPT) -> bytes:
    return command_pb2.Command(alarm=command_pb2.AlarmChange(member_id=member, alarm=name, activate=activate),
                               leader_clock_ms=1000).SerializeToString()


def open_sm(path) -> StateMachine:
    return StateMachine.open(str(path), 64 << 20, fsync=False)


def entries(*datas: bytes, start: int = 1) -> list[tuple[int, int, bytes]]:
    return [(start + i, 1, d) for i, d in enumerate(datas)]


def test_members_applying_the_same_log_hash_the_same_at_the_barrier(tmp_path):
    a, b = open_sm(tmp_path / "a"), open_sm(tmp_path / "b")
    log = entries(put(b"x"), put(b"y", b"1"), BARRIER, put(b"z"))
    ra = a.apply(log)
    for e in log:  # another member, one entry per batch: the same hash at the same index
        b.apply([e])
    assert ra[2] == a.hash_at(3) == b.hash_at(3)
    assert ra[2].index == 3 and ra[2].revision == 2
    assert a.hash_at(4) is None  # only barriers are hashed


def test_the_barrier_hashes_the_state_at_its_index_not_the_batch_end(tmp_path):
    whole, cut = open_sm(tmp_path / "whole"), open_sm(tmp_path / "cut")
    whole.apply(entries(put(b"x"), BARRIER, put(b"later")))
    cut.apply(entries(put(b"x"), BARRIER))
    assert whole.hash_at(2) == cut.hash_at(2)
    cut.apply(entries(put(b"later"), BARRIER, start=3))
    assert cut.hash_at(4).hash != cut.hash_at(2).hash  # the later put changed the state


def test_a_diverged_member_hashes_differently(tmp_path):
    good, bad = open_sm(tmp_path / "good"), open_sm(tmp_path / "bad")
    bad.testing_corrupt()
    log = entries(put(b"x"), BARRIER)
    good.apply(log)
    bad.apply(log)
    assert good.hash_at(2).revision == bad.hash_at(2).revision
    assert good.hash_at(2).hash != bad.hash_at(2).hash


def test_a_changed_key_value_or_version_changes_the_hash(tmp_path):
    def hash_of(name: str, *datas: bytes) -> int:
        sm = open_sm(tmp_path / name)
        sm.apply(entries(*datas, BARRIER))
        return sm.hash_at(len(datas) + 1).hash

    base = hash_of("base", put(b"k", b"ab"), put(b"j", b"ab"))
    assert hash_of("same", put(b"k", b"ab"), put(b"j", b"ab")) == base
    assert hash_of("key", put(b"k", b"ab"), put(b"i", b"ab")) != base
    assert hash_of("value", put(b"k", b"ab"), put(b"j", b"ac")) != base
    # the same keys and values, but k written twice: its version and revisions differ
    assert hash_of("version", put(b"k", b"ab"), put(b"k", b"ab"), put(b"j", b"ab")) != base


def test_only_recent_barriers_are_kept(tmp_path):
    sm = open_sm(tmp_path / "sm")
    sm.apply(entries(*[BARRIER] * (HASHES_KEPT + 5)))
    assert sm.hash_at(1) is None and sm.hash_at(HASHES_KEPT + 5) is not None


def test_alarms_are_replicated_state_that_survives_a_restart(tmp_path):
    sm = open_sm(tmp_path / "sm")
    sm.apply(entries(alarm(3), alarm(2)))
    assert sm.alarms == {(3, alarms.CORRUPT), (2, alarms.CORRUPT)}
    sm.close()
    sm = open_sm(tmp_path / "sm")
    assert sm.alarms == {(3, alarms.CORRUPT), (2, alarms.CORRUPT)}
    sm.apply(entries(alarm(3, activate=False), start=3))
    assert sm.alarms == {(2, alarms.CORRUPT)}
    sm.apply(entries(alarm(0, activate=False, name=""), start=4))  # every member, every alarm
    assert sm.alarms == frozenset()
    sm.close()


def test_an_empty_command_still_applies_as_before(tmp_path):
    sm = open_sm(tmp_path / "sm")
    sm.apply(entries(put(b"x")))
    [r] = sm.apply(entries(command_pb2.Command(leader_clock_ms=1).SerializeToString(), start=2))
    assert r.n == 0 and r.revision == 1 and sm.applied_index == 2


def mark(h: int, rev: int = 5) -> HashMark:
    return HashMark(10, rev, h)


def test_the_member_that_differs_from_the_majority_is_named():
    assert differing({1: mark(7), 2: mark(7), 3: mark(7)}) == []
    assert differing({1: mark(7), 2: mark(7), 3: mark(8)}) == [3]
    assert differing({1: mark(8), 2: mark(7), 3: mark(7)}) == [1]  # the leader can be the corrupt one
    assert differing({1: mark(7), 2: mark(7), 3: mark(7, rev=6)}) == [3]  # a revision that differs, too
    with pytest.raises(ValueError, match="no majority"):
        differing({1: mark(7), 2: mark(8)})
