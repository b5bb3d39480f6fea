"""The map brake (quota.map_nearly_full): past it writes that add data are refused, and what is
left of the LMDB map is enough for the deletes and the compaction that free space again. Without
it a store whose file outgrows its map dies of MDB_MAP_FULL, every member at the same entry."""
from __future__ import annotations

from kvstore.storage import quota
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

MAP = 16 << 20
VALUE = b"v" * 3000  # one overflow page per value


def entry(**kw) -> bytes:
    return command_pb2.Command(leader_clock_ms=1_000, **kw).SerializeToString()


def put(i: int) -> bytes:
    return entry(ops=[kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"k%06d" % i, value=VALUE))])


def test_the_map_brake_leaves_room_to_delete_and_compact(tmp_path):
    sm = StateMachine.open(str(tmp_path / "db"), MAP, fsync=False)  # writemap, as a member runs
    index = sm.applied_index
    try:
        n = 0
        while not quota.map_nearly_full(sm.db_size(), sm.map_size):  # a member refuses from here on
            index += 1
            sm.apply([(index, 1, put(n))])
            n += 1
            if n % 10 == 0:  # a member moves its durable base every few ms: freed pages become reusable
                sm.checkpoint()
        assert n > 100
        index += 1
        (deleted,) = sm.apply([(index, 1, entry(ops=[kv_pb2.RequestOp(
            request_delete_range=kv_pb2.DeleteRangeRequest(key=b"k", range_end=b"l"))]))])
        rev = deleted.revision
        index += 1
        sm.apply([(index, 1, entry(compaction=kv_pb2.CompactionRequest(revision=rev)))])
        while sm.compacting:
            sm.compact_pending()
        assert sm.key_count() == 0
        sm.checkpoint()
        for i in range(n // 2):  # the freed pages take new data
            index += 1
            sm.apply([(index, 1, put(i))])
            if i % 10 == 0:
                sm.checkpoint()
        assert sm.key_count() == n // 2
    finally:
        sm.close()


def test_the_map_is_twice_the_quota():
    assert quota.map_size_for(0) == 8 << 30
    assert quota.map_size_for(quota.MAX_QUOTA_BYTES) == 2 * quota.MAX_QUOTA_BYTES
