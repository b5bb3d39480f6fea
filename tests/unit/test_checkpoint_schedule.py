"""When each member checkpoints: every --snapshot-count entries (never two members together) or
when the WAL outgrows its bound, a snapshot; in between, the durable base alone, every fraction of
a second while entries are applied."""
from __future__ import annotations

import asyncio
import os
import time

from kvstore.raft.types import Entry, HardState
from kvstore.server.config import ServerConfig
from kvstore.server.node import CHECKPOINT_WAL_SEGMENTS, Node, next_checkpoint_at
from kvstore.storage import durable_base
from kvstore.storage.raft_log import RaftLog
from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2


def checkpoints(member: int, members: list[int], count: int, upto: int) -> list[int]:
    out, last = [], 0
    while (due := next_checkpoint_at(last, count, members, member)) <= upto:
        out.append(due)
        last = due + 3  # a checkpoint lands a little past the index that triggered it
    return out


def test_members_checkpoint_at_their_own_phase_every_count_entries():
    members = [1, 2, 3]
    seen = {m: checkpoints(m, members, 900, 9_000) for m in members}
    assert seen[1] == list(range(900, 9_001, 900))
    assert seen[2] == list(range(300, 9_001, 900))
    assert seen[3] == list(range(600, 9_001, 900))
    for a in members:
        for b in members:
            if a < b:
                gaps = [abs(x - y) for x in seen[a] for y in seen[b]]
                assert min(gaps) >= 300 - 3, f"members {a} and {b} checkpoint within {min(gaps)} entries"


def test_a_checkpoint_that_landed_late_does_not_shift_the_phase():
    assert next_checkpoint_at(1_250, 1_000, [1, 2], 2) == 1_500
    assert next_checkpoint_at(1_499, 1_000, [1, 2], 2) == 1_500
    assert next_checkpoint_at(1_500, 1_000, [1, 2], 2) == 2_500
    assert next_checkpoint_at(0, 1_000, [7], 7) == 1_000


def test_a_wal_over_its_size_bound_brings_a_checkpoint_and_goes(tmp_path):
    """Coalesced entries are big: a few of them fill the WAL's bound long before --snapshot-count."""
    segment = 64 << 10
    cfg = ServerConfig(id=1, peers={1: "127.0.0.1:1"}, data_dir=str(tmp_path), snapshot_count=1_000_000,
                       snapshot_catchup_entries=1_000, wal_segment_bytes=segment)
    node = Node(cfg)
    node.sm = StateMachine.open(os.path.join(tmp_path, "db"), 64 << 20, fsync=False)
    node.log = RaftLog.open(os.path.join(tmp_path, "wal"), segment)
    node.snapshots = SnapshotStore(os.path.join(tmp_path, "snap"))
    op = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"k", value=b"v" * (16 << 10)))
    data = command_pb2.Command(ops=[op], leader_clock_ms=1).SerializeToString()
    n = CHECKPOINT_WAL_SEGMENTS * 2 * segment // len(data)  # past the bound at its largest jitter
    entries = [Entry(term=1, index=i, data=data) for i in range(1, n + 1)]
    for e in entries:  # one write each: they fill segment after segment
        node.log.append([e], HardState(term=1, vote=1, commit=e.index))
    node.sm.apply([(e.index, e.term, e.data) for e in entries])
    before = node.log.wal_size()

    async def main() -> None:
        await node._maybe_snapshot()
        assert node._checkpointing is not None, "no checkpoint started for a WAL over its bound"
        await node._checkpointing

    try:
        asyncio.run(main())
        assert node.snapshot_index == n
        kept = n - (node.log.first_index() - 1)
        assert 0 < kept < cfg.snapshot_catchup_entries, f"{kept} entries kept behind the checkpoint"
        assert kept * len(data) <= 2 * segment, "more than about a segment of log kept for followers"
        assert node.log.wal_size() < before
    finally:
        node.sm.close()
        node.log.close()
        node.storage_thread.shutdown()
        node.apply_thread.shutdown()


def test_between_snapshots_the_base_alone_moves_on_after_a_short_gap(tmp_path):
    """Pages rewritten after the durable base stay pinned until the next one: a base sync (the log
    untouched) follows any applied entry --backend-batch-interval after the last, whatever the entry count."""
    cfg = ServerConfig(id=1, peers={1: "127.0.0.1:1"}, data_dir=str(tmp_path), snapshot_count=1_000_000,
                       backend_batch_interval="1s")
    node = Node(cfg)
    node.sm = StateMachine.open(os.path.join(tmp_path, "db"), 64 << 20, fsync=False)
    node.log = RaftLog.open(os.path.join(tmp_path, "wal"))
    node.snapshots = SnapshotStore(os.path.join(tmp_path, "snap"))
    entries = []
    for i in range(1, 41):
        ops = [kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"k%05d" % ((i * 7919 + j) % 5000),
                                                              value=b"v" * 200)) for j in range(100)]
        data = command_pb2.Command(ops=ops, leader_clock_ms=1).SerializeToString()
        entries.append(Entry(term=1, index=i, data=data))
    node.log.append(entries, HardState(term=1, vote=1, commit=40))

    def saved_base() -> int:
        return durable_base.load(os.path.realpath(os.path.join(tmp_path, "db", "current")))[0]

    async def main() -> None:
        await node._maybe_snapshot()
        assert node._checkpointing is None, "a base sync with nothing applied since the last base"
        node.sm.apply([(e.index, e.term, e.data) for e in entries[:20]])
        await node._maybe_snapshot()
        assert node._checkpointing is not None, "no base sync for entries applied since the base"
        await node._checkpointing
        assert node._base_index == 20 == saved_base()
        assert time.monotonic() + 0.5 < node._next_base_sync_at
        node.sm.apply([(e.index, e.term, e.data) for e in entries[20:]])
        await node._maybe_snapshot()
        assert node._checkpointing is None, "a base sync before the gap since the last one ended"
        node._next_base_sync_at = time.monotonic()  # the gap has passed
        await node._maybe_snapshot()
        assert node._checkpointing is not None
        await node._checkpointing
        assert node._base_index == 40 == saved_base()

    try:
        asyncio.run(main())
        assert node.snapshot_index == 0 and node.log.first_index() == 1, "a base sync compacted the log"
    finally:
        node.sm.close()
        node.log.close()
        node.storage_thread.shutdown()
        node.apply_thread.shutdown()
