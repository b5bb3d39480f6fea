"""A node's LMDB map does not stay resident: a checkpoint gives back the pages it wrote.

With MDB_WRITEMAP (how a node opens its store, --state-machine-sync boot) every
page LMDB writes is written through the process's mapping, so without
map_pages.release the history of every write stays in the resident set.
"""
from __future__ import annotations

import os

import pytest

from kvstore.storage import map_pages
from kvstore.storage import state_machine as sm_mod
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

VALUE = os.urandom(1000)
WRITTEN = 24 << 20  # bytes of values written: history and latest pages come to more
KEYS = 2000  # few keys: the kv db stays small, nearly all the pages written are history


def entries(first: int, n: int, ops: int = 64) -> list[tuple[int, int, bytes]]:
    out = []
    for i in range(first, first + n):
        cmd = command_pb2.Command(leader_clock_ms=1_000 + i, ops=[
            kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"k%06d" % ((i * ops + j) % KEYS), value=VALUE))
            for j in range(ops)])
        out.append((i, 1, cmd.SerializeToString()))
    return out


def write_and_checkpoint(sm: StateMachine) -> int:
    """Apply WRITTEN bytes of puts, checkpoint; the map's resident bytes just before the checkpoint."""
    index = 1
    while index * 64 * len(VALUE) < WRITTEN:
        sm.apply(entries(index, 16))
        index += 16
    before = map_pages.resident_bytes(sm.data_path)
    sm.checkpoint()
    return before


@pytest.fixture
def node_store(tmp_path, monkeypatch):
    monkeypatch.setattr(sm_mod, "MAP_RELEASE_INTERVAL_S", 0.0)
    sm = StateMachine.open(str(tmp_path / "sm"), 1 << 30, fsync=False, boot_guard=True)  # as a node opens it
    yield sm
    sm.close()


def test_a_checkpoint_gives_back_the_pages_written(node_store):
    before = write_and_checkpoint(node_store)
    after = map_pages.resident_bytes(node_store.data_path)
    assert before >= WRITTEN, f"writes through the map should be resident: {before >> 20} MiB"
    assert after <= 4 << 20, f"{after >> 20} MiB of the map still resident after a checkpoint"
    # Nothing was lost: the pages come back from the page cache.
    assert node_store.get(b"k%06d" % 7).value == VALUE


def test_without_release_the_written_pages_stay(node_store):
    """The teeth: with the release switched off, the map holds everything written."""
    node_store.testing_keep_map_resident = True
    write_and_checkpoint(node_store)
    assert map_pages.resident_bytes(node_store.data_path) >= WRITTEN


def test_release_is_rate_limited(tmp_path):
    sm = StateMachine.open(str(tmp_path / "sm"), 1 << 30, fsync=False, boot_guard=True)
    try:
        sm.checkpoint()  # open checkpointed already: within the interval, this one keeps the pages
        sm.apply(entries(1, 16))
        sm.checkpoint()
        assert map_pages.resident_bytes(sm.data_path) >= 16 * 64 * len(VALUE)
    finally:
        sm.close()


def test_mappings_finds_only_that_file(tmp_path):
    sm = StateMachine.open(str(tmp_path / "sm"), 1 << 30, fsync=False, boot_guard=True)
    try:
        ranges = map_pages.mappings(sm.data_path)
        assert len(ranges) == 1 and ranges[0][1] - ranges[0][0] == 1 << 30  # the whole map, once
        assert map_pages.mappings(os.path.join(os.path.dirname(sm.data_path), "lock.mdb")) != ranges
    finally:
        sm.close()
