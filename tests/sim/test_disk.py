"""The simulator's disk model loses what the crash it models would lose, and nothing else."""
from __future__ import annotations

import random

import pytest

from kvstore.raft.types import ConfState, Entry, HardState, SnapshotMetadata
from kvstore.storage.storage_fault import StorageFault

from .disk import IMAGE, Crash, Disk, Faults


def disk(**p: float) -> Disk:
    probs = dict(p_crash_fsync=0.0, p_crash_install=0.0, p_fsync_error=0.0, p_power=0.0)
    probs.update(p)
    return Disk(1, Faults(random.Random(1), **probs))


def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term=term, index=i, data=b"e%d" % i) for i in range(lo, hi + 1)]


def test_a_kill_inside_a_wal_write_keeps_the_write():
    d = disk(p_crash_fsync=1.0, p_power=0.0)
    with pytest.raises(Crash) as c:
        d.wal.append(ents(1, 5), HardState(1, 1, 0))
    assert not c.value.power
    assert d.wal.last_index() == 5 and d.wal.hard_state() == HardState(1, 1, 0)


def test_a_power_cut_inside_a_wal_write_keeps_at_most_a_prefix_and_never_the_hard_state():
    lasts = set()
    for seed in range(30):
        d = Disk(1, Faults(random.Random(seed), 1.0, 0.0, 0.0, 1.0))
        with pytest.raises(Crash):
            d.wal.append(ents(1, 5), HardState(1, 1, 0))
        assert d.wal.hard_state() == HardState()
        lasts.add(d.wal.last_index())
        assert [e.index for e in d.wal.entries(1, d.wal.last_index() + 1)] == list(range(1, d.wal.last_index() + 1))
    assert lasts - {0, 5}  # torn in the middle at times


def test_a_failed_fsync_drops_the_write_and_raises():
    d = disk(p_fsync_error=1.0)
    with pytest.raises(StorageFault, match="fdatasync"):
        d.wal.append(ents(1, 3))
    assert d.wal.last_index() == 0


def test_a_power_cut_rolls_the_state_machine_back_to_its_durable_base():
    d = disk()
    d.sm.on_apply = lambda *a: None
    d.wal.append(ents(1, 6))
    d.sm.apply([(e.index, e.term, e.data) for e in ents(1, 3)])
    d.sm.checkpoint()
    d.sm.apply([(e.index, e.term, e.data) for e in ents(4, 6)])
    d.sm.power_loss()
    assert d.sm.applied_index == 3


@pytest.mark.parametrize("point,installed", [("install-copy", False), ("install-verify", False),
                                             ("install-rename", False), ("install-reopen", True)])
def test_an_install_crashed_before_the_swap_leaves_the_old_state_after_it_the_new(point, installed):
    d = disk()
    meta = SnapshotMetadata(index=9, term=3, conf_state=ConfState(voters=[1]))
    d.images.publish(meta, IMAGE.pack(9, 3, 1234))
    path = d.images.list()[0][3]
    d.faults.p_crash_install = 1.0
    original = d.faults.crash

    def crash_at(name: str, p: float) -> None:
        if name == point:
            original(name, 1.0)

    d.faults.crash = crash_at  # type: ignore[method-assign]
    with pytest.raises(Crash):
        d.sm.install_snapshot(path)
    d.sm.power_loss()
    assert (d.sm.applied_index == 9) == installed
