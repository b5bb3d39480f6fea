"""The boot guard: an LMDB state machine committed without fdatasync is trusted
within the boot that wrote it and, after a reboot, rolled back to its durable base
(durable_base.py) or discarded without one (see boot_guard.py).

A reboot is stood in for by another boot id (KVSTORE_TESTING_BOOT_ID); a
process crash by closing the environment without the final sync and disarm.
"""
from __future__ import annotations

import os

import lmdb
import pytest

from kvstore.storage import boot_guard
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2


def put(index: int, key: bytes) -> tuple[int, int, bytes]:
    op = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=key, value=b"v"))
    return index, 1, command_pb2.Command(leader_clock_ms=1_000, ops=[op]).SerializeToString()


def open_guarded(path: str) -> StateMachine:
    return StateMachine.open(path, 64 << 20, fsync=False, boot_guard=True)


def die(sm: StateMachine) -> None:
    """What a kill -9 leaves: the environment closed without the final sync, the guard armed."""
    sm._env.close()
    sm._env = None


@pytest.fixture
def boot(monkeypatch):
    def set_boot(boot_id: str) -> None:
        monkeypatch.setenv(boot_guard.TESTING_BOOT_ID_ENV, boot_id)

    set_boot("boot-a")
    return set_boot


def test_real_boot_id_is_readable():
    assert boot_guard.boot_id(), "this kernel exposes no boot id: the node would sync every commit"


def test_guard_records_the_boot_and_a_clean_close_removes_it(tmp_path, boot):
    path = str(tmp_path / "sm")
    sm = open_guarded(path)
    with open(os.path.join(path, boot_guard.GUARD_NAME)) as f:
        assert f.read().strip() == "boot-a"
    sm.apply([put(1, b"a")])
    sm.close()
    assert not os.path.exists(os.path.join(path, boot_guard.GUARD_NAME))
    boot("boot-b")  # synced at close: a reboot afterwards loses nothing
    sm = open_guarded(path)
    assert (sm.applied_index, set(sm.dump())) == (1, {b"a"})
    sm.close()


def killed_after_unsynced_puts(path: str, n: int) -> None:
    """A guarded state machine that applied puts 1..n and then died (kill -9)."""
    sm = open_guarded(path)
    sm.apply([put(i, b"k%04d" % i) for i in range(1, n + 1)])
    die(sm)


def test_process_crash_in_the_same_boot_keeps_the_state(tmp_path, boot):
    path = str(tmp_path / "sm")
    killed_after_unsynced_puts(path, 2)
    sm = open_guarded(path)
    assert (sm.applied_index, set(sm.dump())) == (2, {b"k0001", b"k0002"})
    sm.close()


def test_unsynced_state_from_another_boot_is_discarded(tmp_path, boot):
    path = str(tmp_path / "sm")
    killed_after_unsynced_puts(path, 2)
    boot("boot-b")  # the OS crashed: those commits may be torn or lost
    sm = open_guarded(path)
    assert (sm.applied_index, sm.revision, sm.dump()) == (0, 0, {})
    with open(os.path.join(path, boot_guard.GUARD_NAME)) as f:
        assert f.read().strip() == "boot-b"  # armed again, for this boot
    sm.apply([put(1, b"a")])  # and it works as a fresh state machine
    sm.close()


def torn_by_an_os_crash(path: str) -> None:
    """A guarded state machine with data, left the way an OS crash can leave it: meta pages
    on disk, data pages (every allocated block after them; the file is sparse) not."""
    killed_after_unsynced_puts(path, 1999)
    data, page = os.path.join(path, "current", "data.mdb"), 4096
    allocated = os.stat(data).st_blocks * 512  # from offset 0: the disk reservation is one range
    with open(data, "r+b") as f:
        f.seek(2 * page)
        f.write(b"\0" * (allocated - 2 * page))


def test_a_torn_file_from_another_boot_opens_empty_instead_of_failing(tmp_path, boot):
    path = str(tmp_path / "sm")
    torn_by_an_os_crash(path)
    boot("boot-b")
    sm = open_guarded(path)
    assert sm.applied_index == 0 and sm.dump() == {}
    sm.close()


def test_without_the_guard_the_torn_file_is_trusted_and_broken(tmp_path, boot):
    """The teeth of the test above: the same torn file, opened in the boot that wrote it."""
    path = str(tmp_path / "sm")
    torn_by_an_os_crash(path)
    with pytest.raises(lmdb.Error):
        sm = open_guarded(path)
        sm.dump()


def test_reopening_with_per_commit_fsync_still_honours_the_guard(tmp_path, boot):
    path = str(tmp_path / "sm")
    sm = open_guarded(path)
    sm.apply([put(1, b"a")])
    die(sm)
    sm = StateMachine.open(path, 64 << 20, fsync=True)  # same boot: kept, and disarmed at a clean close
    assert sm.applied_index == 1
    sm.close()
    assert not boot_guard.armed(path)
    sm = open_guarded(path)
    sm.apply([put(2, b"b")])
    die(sm)
    boot("boot-b")
    sm = StateMachine.open(path, 64 << 20, fsync=True)  # another boot: rolled back, whatever the mode
    assert (sm.applied_index, set(sm.dump())) == (1, {b"a"}) and not boot_guard.armed(path)
    sm.close()


def churn(sm: StateMachine, first: int, n: int) -> None:
    """Rewrite and delete many keys over many commits: later commits reuse freed pages."""
    for i in range(first, first + n):
        ops = [kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"k%04d" % ((i * 7 + j) % 1999), value=b"w" * 300))
               for j in range(20)]
        ops.append(kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=b"k%04d" % (i % 1999))))
        sm.apply([(i, 1, command_pb2.Command(leader_clock_ms=1_000, ops=ops).SerializeToString())])


def crashed_after_a_checkpoint(path: str, unpinned: bool) -> dict:
    """Puts, a checkpoint, then many unsynced commits that all reached the file: the worst an
    OS crash can leave for the base's pages. Returns the state at the checkpoint."""
    sm = open_guarded(path)
    sm.testing_unpinned_base = unpinned
    sm.apply([put(i, b"k%04d" % i) for i in range(1, 2000)])
    assert sm.checkpoint() == (1999, 1)
    at_base = sm.dump()
    churn(sm, 2000, 300)
    die(sm)
    return at_base


def test_an_os_crash_rolls_back_to_the_durable_base(tmp_path, boot):
    path = str(tmp_path / "sm")
    at_base = crashed_after_a_checkpoint(path, unpinned=False)
    boot("boot-b")
    sm = open_guarded(path)
    assert sm.applied_index == 1999
    assert sm.dump() == at_base
    churn(sm, 2000, 50)  # and it goes on from there
    sm.close()


def test_without_the_pin_later_commits_overwrite_the_base(tmp_path, boot):
    """The teeth of the test above: a base left unpinned is overwritten by reused pages."""
    path = str(tmp_path / "sm")
    at_base = crashed_after_a_checkpoint(path, unpinned=True)
    boot("boot-b")
    sm = open_guarded(path)
    try:
        rolled_back = (sm.applied_index, sm.dump())
    except lmdb.Error:
        rolled_back = None
    assert rolled_back != (1999, at_base)
    sm.close()


def test_per_commit_fsync_and_the_guard_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="boot_guard"):
        StateMachine.open(str(tmp_path / "sm"), 64 << 20, fsync=True, boot_guard=True)

