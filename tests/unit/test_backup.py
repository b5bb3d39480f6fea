"""Backup files and restore: a whole-file checksum, refusal of damaged files, a fresh data dir."""
from __future__ import annotations

import os

import pytest

from kvstore.raft import Config, RawNode
from kvstore.storage import cluster_identity
from kvstore.storage.members import MemberSet
from kvstore.storage.backup import TRAILER_SIZE, BackupError, verify, write_backup
from kvstore.storage.raft_log import RaftLog
from kvstore.storage.reconcile import reconcile
from kvstore.storage.restore import RestoreError, restore
from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

MEMBERS = {1: "127.0.0.1:1", 2: "127.0.0.1:2", 3: "127.0.0.1:3"}


def _put(key: bytes, value: bytes) -> bytes:
    op = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=key, value=value))
    return command_pb2.Command(leader_clock_ms=1000, ops=[op]).SerializeToString()


@pytest.fixture
def source(tmp_path):
    sm = StateMachine.open(str(tmp_path / "src"), fsync=False)
    sm.set_members(MemberSet.initial({1: "10.0.0.1:1", 9: "10.0.0.9:1"}, {}))
    sm.apply([(i, 2, _put(b"k%03d" % i, b"v" * i)) for i in range(1, 101)])
    yield sm
    sm.close()


def _save(sm: StateMachine, path: str):
    index, term, stream = sm.open_image()
    try:
        return write_backup(path, iter(lambda: stream.read(1 << 14), b""))
    finally:
        stream.close()


def test_save_then_status(source, tmp_path):
    info = _save(source, str(tmp_path / "b.db"))
    assert (info.index, info.term, info.revision, info.keys) == (100, 2, 100, 100)
    assert info.size + TRAILER_SIZE == os.path.getsize(tmp_path / "b.db")
    assert verify(str(tmp_path / "b.db")) == info
    # the hash is the one the members compute at a hash barrier over the same state (HashKV)
    barrier = command_pb2.Command(hash_barrier=True, leader_clock_ms=1000).SerializeToString()
    (mark,) = source.apply([(101, 2, barrier)])
    assert (mark.revision, mark.hash) == (info.revision, info.hash)


@pytest.mark.parametrize("wrong", ["size", "digest"])
def test_announced_size_and_digest_must_match(source, tmp_path, wrong):
    good = _save(source, str(tmp_path / "good.db"))
    announced = (good.size + 1, bytes.fromhex(good.sha256)) if wrong == "size" else (good.size, b"\0" * 32)
    index, term, stream = source.open_image()
    try:
        with pytest.raises(BackupError, match="bytes of image" if wrong == "size" else "SHA-256"):
            write_backup(str(tmp_path / "b.db"), iter(lambda: stream.read(1 << 14), b""), expected=lambda: announced)
    finally:
        stream.close()
    assert sorted(os.listdir(tmp_path)) == ["good.db", "src"]  # nothing left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "trailer"])
def test_damaged_backup_refused_and_nothing_written(source, tmp_path, damage):
    path = str(tmp_path / "b.db")
    info = _save(source, path)
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(info.size // 2)
        elif damage == "flip":
            f.seek(info.size // 2)
            b = f.read(1)
            f.seek(info.size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
        else:
            f.truncate(info.size + TRAILER_SIZE - 1)
    with pytest.raises(BackupError):
        verify(path)
    target = tmp_path / "restored"
    with pytest.raises(BackupError):
        restore(path, str(target), 1, MEMBERS, "tok")
    assert not target.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".restore-")] == []


def test_restore_writes_a_member_that_starts_at_the_backup(source, tmp_path):
    path = str(tmp_path / "b.db")
    _save(source, path)
    dirs = {i: str(tmp_path / f"node{i}") for i in MEMBERS}
    ids = set()
    for i, d in dirs.items():
        _, cid = restore(path, d, i, MEMBERS, "tok")
        ids.add(cid)
    assert len(ids) == 1 and 0 not in ids  # every member computes the same new cluster id
    assert cluster_identity.derive_cluster_id(MEMBERS, "other") not in ids

    d = dirs[2]
    assert cluster_identity.read(d) == cluster_identity.ClusterIdentity(ids.pop(), 2)
    sm = StateMachine.open(os.path.join(d, "db"), fsync=False, boot_guard=True)
    log = RaftLog.open(os.path.join(d, "wal"))
    try:
        assert (sm.applied_index, sm.applied_term, sm.revision, sm.key_count()) == (100, 2, 100, 100)
        assert sm.dump() == source.dump()
        assert sm.members.peer_addrs() == MEMBERS and sm.members.removed == ()  # the new cluster's members
        reconcile(sm, log, SnapshotStore(os.path.join(d, "snap")))  # the start-up invariant holds as is
        assert (log.first_index(), log.last_index(), log.term(100)) == (101, 100, 2)
        hs, cs = log.initial_state()
        assert (hs.term, hs.commit, cs.voters) == (2, 100, [1, 2, 3])
        raw = RawNode(Config(id=2, peers=[], applied=sm.applied_index), log)
        assert raw.conf_state().voters == [1, 2, 3] and raw.status().term == 2
    finally:
        log.close()
        sm.close()


def test_restore_refuses_a_used_dir_or_an_unknown_member(source, tmp_path):
    path = str(tmp_path / "b.db")
    _save(source, path)
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me")
    with pytest.raises(RestoreError, match="not empty"):
        restore(path, str(used), 1, MEMBERS, "tok")
    assert os.listdir(used) == ["x"]
    with pytest.raises(RestoreError, match="member 4"):
        restore(path, str(tmp_path / "n4"), 4, MEMBERS, "tok")
    assert not (tmp_path / "n4").exists()


def test_identity_refuses_another_cluster_or_member(tmp_path):
    cluster_identity.write(str(tmp_path), cluster_identity.ClusterIdentity(77, 2))
    assert cluster_identity.check(str(tmp_path), 0, 2) == 77
    assert cluster_identity.check(str(tmp_path), 77, 2) == 77
    with pytest.raises(cluster_identity.ClusterIdentityError, match="cluster 77"):
        cluster_identity.check(str(tmp_path), 5, 2)
    with pytest.raises(cluster_identity.ClusterIdentityError, match="member 2"):
        cluster_identity.check(str(tmp_path), 0, 3)
    assert cluster_identity.check(str(tmp_path / "fresh"), 9, 1) == 9
