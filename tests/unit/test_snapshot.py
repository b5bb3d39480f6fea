"""Snapshots: create, stream, receive, install — and crashes in the middle of installing."""
from __future__ import annotations

import os
import shutil

import pytest

from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.state_machine import SnapshotImageError, StateMachine
from kvstore.storage.wal import crc32c
from kvstore.v1 import command_pb2, kv_pb2

INSTALL_STEPS = ["copy", "verify", "rename", "swap", "reopen", "cleanup"]
COMMITTED_FROM = INSTALL_STEPS.index("swap")  # a crash at or after this step keeps the new state


def put(k, v):
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v))


def cmd(*ops, client=0, seq=0, at=1_000):
    return command_pb2.Command(
        request_id=kv_pb2.RequestId(client_id=client, seq=seq, opens_session=seq == 1), leader_clock_ms=at, ops=ops
    ).SerializeToString()


def open_sm(path) -> StateMachine:
    return StateMachine.open(str(path), 64 << 20, fsync=False)


def fill(sm: StateMachine, start: int, n: int, term: int = 2) -> None:
    entries = []
    for i in range(n):
        idx = start + i
        entries.append((idx, term, cmd(
            put(b"k%03d" % (idx % 40), b"v%d" % idx), client=1 + idx % 3, seq=(idx - 1) // 3 + 1, at=1_000 + idx
        )))
    sm.apply(entries)


def state(sm: StateMachine):
    return (sm.dump(), sm.revision, sm.applied_index, sm.applied_term, sm.log_time_ms, sm.dump_sessions())


class Crash(Exception):
    """Stands in for the process dying at an install step."""


@pytest.fixture
def source(tmp_path):
    sm = open_sm(tmp_path / "source")
    fill(sm, 1, 100)
    yield sm
    sm.close()


def test_round_trip_restores_everything(tmp_path, source):
    store = SnapshotStore(str(tmp_path / "snaps"))
    index, term, path = store.create(source, [1, 2, 3])
    assert (index, term) == (100, 2)
    assert store.latest() == (100, 2, [1, 2, 3], path)
    want = state(source)

    fresh = open_sm(tmp_path / "wiped")
    fresh.install_snapshot(path)
    assert state(fresh) == want
    # the session table came along: a retry is answered, not re-applied
    first = source.apply([(101, 2, cmd(put(b"x", b"1"), client=9, seq=1))])[0]
    retry = fresh.apply([(101, 2, cmd(put(b"x", b"1"), client=9, seq=1))])[0]
    assert retry == first
    old = fresh.apply([(102, 2, cmd(put(b"k017", b"v97"), client=2, seq=33, at=1_200))])[0]  # index 97's
    assert isinstance(old, command_pb2.CommandResult) and fresh.get(b"k017").mod_revision < 100
    assert old == source.apply([(102, 2, cmd(put(b"k017", b"v97"), client=2, seq=33, at=1_200))])[0]
    assert state(fresh) == state(source)
    fresh.close()
    reopened = open_sm(tmp_path / "wiped")
    assert state(reopened) == state(source)
    reopened.close()


def test_stream_receive_install(tmp_path, source):
    sender = SnapshotStore(str(tmp_path / "a"))
    receiver = SnapshotStore(str(tmp_path / "b"))
    index, term, _ = sender.create(source, [1, 2])
    with sender.open_reader(index) as r, receiver.receive(index, term, [1, 2]) as w:
        size, crc = 0, 0
        while chunk := r.read(4096):
            w.write(chunk)
            size, crc = size + len(chunk), crc32c(chunk, crc)
        path = w.commit(size, crc)
    assert receiver.latest() == (index, term, [1, 2], path)
    follower = open_sm(tmp_path / "follower")
    fill(follower, 1, 10)  # behind, with different history
    follower.install_snapshot(path)
    assert state(follower) == state(source)
    follower.close()


def test_received_image_is_checked(tmp_path, source):
    sender = SnapshotStore(str(tmp_path / "a"))
    receiver = SnapshotStore(str(tmp_path / "b"))
    index, term, path = sender.create(source, [1])
    data = open(path, "rb").read()
    half = data[: len(data) // 2]
    w = receiver.receive(index, term, [1])
    w.write(half)
    with pytest.raises(SnapshotImageError, match="truncated"):
        w.commit(len(half), crc32c(half))
    w = receiver.receive(index + 1, term, [1])
    w.write(data)
    with pytest.raises(SnapshotImageError, match="announced index"):
        w.commit(len(data), crc32c(data))
    with receiver.receive(index, term, [1]) as w:
        w.write(b"\0" * 8192)
        with pytest.raises(SnapshotImageError):
            w.commit(8192, crc32c(b"\0" * 8192))
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x40  # one bit changed on the way
    w = receiver.receive(index, term, [1])
    w.write(bytes(flipped))
    with pytest.raises(SnapshotImageError, match="CRC32C"):
        w.commit(len(data), crc32c(data))
    w = receiver.receive(index, term, [1])
    w.write(data[:100])
    w.abort()
    assert receiver.latest() is None and os.listdir(receiver.dir) == []


def test_keeps_last_n_and_cleans_debris(tmp_path, source):
    store = SnapshotStore(str(tmp_path / "snaps"), keep=2)
    made = []
    for start in (101, 121, 141):
        fill(source, start, 20)
        made.append(store.create(source, [1]))
    assert [s[0] for s in store.list()] == [140, 160]
    assert store.create(source, [1]) == made[-1]  # nothing new applied: same snapshot
    with pytest.raises(FileNotFoundError):
        store.open_reader(120)
    # a crash between the image rename and the .meta leaves an orphan image
    open(os.path.join(store.dir, "0000000000000009-00000000000000ff.snap"), "wb").close()
    open(os.path.join(store.dir, ".tmp-abc.snap"), "wb").close()
    store = SnapshotStore(str(tmp_path / "snaps"), keep=2)
    assert sorted(os.listdir(store.dir)) == sorted(
        os.path.basename(p)[: -len(".snap")] + ext for _, _, _, p in store.list() for ext in (".snap", ".meta")
    )


def test_installing_an_older_snapshot_is_refused(tmp_path, source):
    store = SnapshotStore(str(tmp_path / "snaps"))
    _, _, path = store.create(source, [1])
    fill(source, 101, 5)
    with pytest.raises(SnapshotImageError, match="older than applied"):
        source.install_snapshot(path)
    assert source.applied_index == 105


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_crash_during_install_leaves_old_or_new_state(tmp_path, source, step):
    store = SnapshotStore(str(tmp_path / "snaps"))
    _, _, path = store.create(source, [1])
    new_state = state(source)

    target_dir = tmp_path / "target"
    target = open_sm(target_dir)
    fill(target, 1, 30, term=1)
    old_state = state(target)

    def hook(at):
        if at == step:
            raise Crash(at)

    target.testing_install_hook = hook
    with pytest.raises(Crash):
        target.install_snapshot(path)
    target.close()  # the process is gone; only the disk remains

    after = open_sm(target_dir)
    expected = new_state if INSTALL_STEPS.index(step) >= COMMITTED_FROM else old_state
    assert state(after) == expected
    # leftovers of the interrupted install are gone; only the live generation remains
    live = os.readlink(target_dir / "current")
    assert sorted(os.listdir(target_dir)) == sorted(["current", live])
    # and a second install, uninterrupted, still works (from a copy: an installed image is the live
    # file, linked into the generation)
    again = str(tmp_path / "again.snap")
    shutil.copyfile(path, again)
    after.install_snapshot(again)
    assert state(after) == new_state
    after.close()


def test_a_half_removed_generation_is_never_reused(tmp_path):
    """A discard (boot guard) that crashed after removing `current` but before the generation
    was gone: the next open starts empty in a generation of a new name, never the old file."""
    root = tmp_path / "sm"
    sm = open_sm(root)
    fill(sm, 1, 50)
    old_gen = os.readlink(root / "current")
    sm.close()
    os.unlink(root / "current")
    os.unlink(root / old_gen / "lock.mdb")  # the rmtree got this far
    sm = open_sm(root)
    assert (sm.applied_index, sm.dump()) == (0, {})
    assert os.readlink(root / "current") != old_gen
    assert sorted(os.listdir(root)) == sorted(["current", os.readlink(root / "current")])
    sm.close()


def test_an_image_streams_from_a_read_transaction_while_writes_go_on(tmp_path, source):
    want = state(source)
    index, term, stream = source.open_image()
    fill(source, 101, 60)  # applies go on while the copy is under way (the pipe is full)
    image = tmp_path / "image.mdb"
    with open(image, "wb") as f:
        while chunk := stream.read(1 << 16):
            f.write(chunk)
    stream.close()
    assert (index, term) == (100, 2)
    fresh = open_sm(tmp_path / "fresh")
    fresh.install_snapshot(str(image))
    assert state(fresh) == want
    fresh.close()


def test_an_image_stream_closed_early_releases_everything(tmp_path, source):
    _, _, stream = source.open_image()
    assert len(stream.read(4096)) == 4096
    stream.close()  # the copy thread stops (EPIPE) and its read transaction ends
    _, _, unread = source.open_image()
    source.close()  # also ends a stream still open
    with pytest.raises(ValueError):
        unread.read(1)
