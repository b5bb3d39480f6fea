"""Restarting after a crash in the middle of a snapshot install (or a power loss after receiving one).

Each test lays out on disk what a member holds when it dies at one step, runs the node's
start-up reconciliation on real storage (LMDB state machine, native WAL, snapshot store)
and then starts the Raft core on that log, as `Node.start` does. The member must come up
with a log that continues from what its state machine holds: never a commit index over an
entry of another term, never a state machine ahead of the log.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from kvstore.raft import Config, RawNode, faults
from kvstore.raft.types import ConfState, Entry, HardState, SnapshotMetadata
from kvstore.server.config import ServerConfig
from kvstore.server.node import Node
from kvstore.storage.raft_log import RaftLog
from kvstore.storage.reconcile import reconcile
from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

VOTERS = [1, 2, 3]


def put_cmd(key: bytes, value: bytes) -> bytes:
    op = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=key, value=value))
    return command_pb2.Command(ops=[op], leader_clock_ms=1_000).SerializeToString()


def entries(lo: int, hi: int, term: int) -> list[Entry]:
    """Entries big enough that a few fill a 4 KiB WAL segment (so compaction drops segments)."""
    return [Entry(term=term, index=i, data=put_cmd(b"k%d" % i, b"t%d" % term + b"." * 400))
            for i in range(lo, hi + 1)]


class Member:
    """The storage of one member, opened as Node.start opens it."""

    def __init__(self, root) -> None:
        self.root = str(root)
        self.open()

    def open(self) -> None:
        self.sm = StateMachine.open(os.path.join(self.root, "db"), 64 << 20, fsync=False)
        self.log = RaftLog.open(os.path.join(self.root, "wal"), 4096, self.sm.applied_index)
        self.snapshots = SnapshotStore(os.path.join(self.root, "snap"))

    def close(self) -> None:
        self.sm.close()
        self.log.close()

    def restart(self) -> None:
        """Stop (the crash already happened on disk) and open again, reconciling as Node.start does."""
        self.close()
        self.open()
        node = Node(ServerConfig(id=1, peers={i: f"127.0.0.1:{i}" for i in VOTERS}))
        node.sm, node.log, node.snapshots = self.sm, self.log, self.snapshots
        try:
            asyncio.run(node._reconcile_storage())
        finally:
            node.storage_thread.shutdown(wait=True)
            node.apply_thread.shutdown(wait=True)

    def raw_node(self) -> RawNode:
        return RawNode(Config(id=1, peers=VOTERS, applied=self.sm.applied_index), self.log)


def leader_image(tmp_path, index: int, term: int) -> str:
    """The image a leader at (index, term) streams: its own state machine, received into `snap`."""
    sm = StateMachine.open(str(tmp_path / "leader-db"), 64 << 20, fsync=False)
    sm.apply([(e.index, e.term, e.data) for e in entries(1, 5, 1)])
    sm.apply([(e.index, e.term, e.data) for e in entries(6, index, term)])
    store = SnapshotStore(str(tmp_path / "leader-snap"))
    _, _, path = store.create(sm, VOTERS)
    sm.close()
    return path


def receive(member: Member, image: str, index: int, term: int) -> str:
    with open(image, "rb") as src, member.snapshots.receive(index, term, VOTERS) as w:
        while chunk := src.read(1 << 16):
            w.write(chunk)
        return w.commit(w.size, w.crc)


def stale_tail_member(tmp_path) -> Member:
    """Entries 1..5 of term 1 committed and applied, 6..12 an uncommitted tail of term 2 (it led alone)."""
    m = Member(tmp_path / "f")
    m.log.append(entries(1, 5, 1) + entries(6, 12, 2), HardState(term=2, vote=1, commit=5))
    m.sm.apply([(e.index, e.term, e.data) for e in entries(1, 5, 1)])
    return m


def assert_log_continues_from_state_machine(m: Member) -> None:
    applied, applied_term = m.sm.applied_index, m.sm.applied_term
    assert m.log.first_index() - 1 <= applied <= m.log.last_index()
    assert m.log.term(applied) == applied_term, \
        f"the log holds term {m.log.term(applied)} at {applied}; the state machine applied term {applied_term}"
    raw = m.raw_node()
    committed = raw.raft.log.committed
    assert committed >= applied
    assert raw.raft.log.term(applied) == applied_term


def test_crash_after_installing_the_state_machine_before_resetting_the_log(tmp_path):
    """The snapshot at 9 (term 3) is in LMDB; the WAL still holds the stale tail with term 2 at 9."""
    image = leader_image(tmp_path, 9, 3)
    m = stale_tail_member(tmp_path)
    path = receive(m, image, 9, 3)
    m.sm.install_snapshot(path)  # ... and the process dies before log.apply_snapshot
    m.restart()
    assert m.sm.applied_index == 9
    assert_log_continues_from_state_machine(m)
    assert m.log.last_index() == 9  # the stale tail is gone
    m.close()


def test_crash_after_receiving_before_installing(tmp_path):
    """The snapshot at 9 (term 3) is published, LMDB and the WAL untouched: the WAL's term at 9 is 2."""
    image = leader_image(tmp_path, 9, 3)
    m = stale_tail_member(tmp_path)
    receive(m, image, 9, 3)
    m.restart()
    assert_log_continues_from_state_machine(m)
    m.close()


def test_power_loss_after_receiving_a_snapshot_beyond_the_log(tmp_path):
    """The WAL was compacted (its base is past 0), then a snapshot beyond its last index arrived
    and the power went out: the boot guard discards LMDB, which opens empty."""
    m = Member(tmp_path / "f")
    m.log.append(entries(1, 40, 1), HardState(term=1, vote=1, commit=40))
    m.sm.apply([(e.index, e.term, e.data) for e in entries(1, 40, 1)])
    m.log.set_snapshot(SnapshotMetadata(index=40, term=1, conf_state=ConfState(voters=VOTERS)))
    m.log.compact(40)
    m.close()
    m.open()
    assert m.log.first_index() > 2, "the test needs a WAL compacted on disk"
    receive(m, leader_image(tmp_path, 60, 2), 60, 2)
    m.close()
    db = os.path.join(m.root, "db")
    for name in os.listdir(db):  # what the boot guard does after an OS crash
        p = os.path.join(db, name)
        os.unlink(p) if os.path.islink(p) or os.path.isfile(p) else __import__("shutil").rmtree(p)
    m.open()
    assert m.sm.applied_index == 0
    m.restart()
    assert m.sm.applied_index == 60
    assert_log_continues_from_state_machine(m)
    m.close()


def test_orphan_meta_without_its_image_is_removed(tmp_path):
    m = stale_tail_member(tmp_path)
    path = receive(m, leader_image(tmp_path, 9, 3), 9, 3)
    os.unlink(path)  # the image's unlink reached the disk, the .meta's did not
    m.close()
    store = SnapshotStore(os.path.join(m.root, "snap"))
    assert store.latest() is None
    assert os.listdir(store.dir) == []


@pytest.mark.parametrize("step", ["copy", "verify", "rename", "swap", "reopen", "cleanup"])
def test_crash_at_any_install_step_over_a_stale_tail(tmp_path, step):
    image = leader_image(tmp_path, 9, 3)
    m = stale_tail_member(tmp_path)
    path = receive(m, image, 9, 3)

    class Crash(Exception):
        pass

    def hook(at: str) -> None:
        if at == step:
            raise Crash(at)

    m.sm.testing_install_hook = hook
    with pytest.raises(Crash):
        m.sm.install_snapshot(path)
    m.restart()
    assert_log_continues_from_state_machine(m)
    m.close()


def test_the_planted_skip_of_the_term_check_leaves_a_commit_over_a_stale_entry(tmp_path):
    """The switch the simulator plants (faults.RECONCILE_WITHOUT_TERM_CHECK), on real storage:
    the check above then fails, so it would catch reconcile without the term check."""
    image = leader_image(tmp_path, 9, 3)
    m = stale_tail_member(tmp_path)
    m.sm.install_snapshot(receive(m, image, 9, 3))
    reconcile(m.sm, m.log, m.snapshots, bugs=frozenset({faults.RECONCILE_WITHOUT_TERM_CHECK}))
    with pytest.raises(AssertionError, match="the log holds term 2 at 9"):
        assert_log_continues_from_state_machine(m)
    m.close()
