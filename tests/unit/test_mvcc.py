"""MVCC history in the state machine: reads at a revision, compaction, events (history.py)."""
from __future__ import annotations

import random

import pytest

from kvstore.storage import history, keys
from kvstore.storage.errors import ApplyError, ErrorCode
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2


def put(k, v=b"v"):
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v))


def delete(k, end=b""):
    return kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=k, range_end=end))


def txn(*success):
    return kv_pb2.RequestOp(request_txn=kv_pb2.TxnRequest(success=success))


def cmd(*ops):
    return command_pb2.Command(leader_clock_ms=1, ops=ops).SerializeToString()


def compaction(rev):
    return command_pb2.Command(compaction=kv_pb2.CompactionRequest(revision=rev)).SerializeToString()


class Log:
    def __init__(self, sm):
        self.sm, self.index = sm, sm.applied_index

    def __call__(self, *datas):
        batch = []
        for d in datas:
            self.index += 1
            batch.append((self.index, 1, d))
        results = self.sm.apply(batch)
        return results[0] if len(results) == 1 else results


@pytest.fixture
def sm(tmp_path):
    s = StateMachine.open(str(tmp_path / "sm"), 256 << 20, fsync=False)
    yield s
    s.close()


@pytest.fixture
def log(sm):
    return Log(sm)


def get(sm, key, rev=0, end=b""):
    resp = sm.range(kv_pb2.RangeRequest(key=key, range_end=end, revision=rev))
    return [(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in resp.kvs]


def history_size(sm):
    """(events in history, tombstones)"""
    with sm._env.begin() as t:
        return t.stat(sm._hist)["entries"], t.stat(sm._tombs)["entries"]


def test_reads_at_a_revision(sm, log):
    log(cmd(put(b"a", b"1")))                          # 1
    log(cmd(put(b"b", b"1")))                          # 2
    log(cmd(put(b"a", b"2")))                          # 3
    log(cmd(delete(b"b")))                             # 4
    log(cmd(txn(put(b"c", b"1"), put(b"a", b"3"))))    # 5: two writes, one revision
    assert get(sm, b"a", 1) == [(b"a", b"1", 1, 1, 1)]
    assert get(sm, b"a", 2) == [(b"a", b"1", 1, 1, 1)]
    assert get(sm, b"a", 3) == [(b"a", b"2", 1, 3, 2)]
    assert get(sm, b"b", 3) == [(b"b", b"1", 2, 2, 1)]
    assert get(sm, b"b", 4) == []
    assert get(sm, b"a", 5) == get(sm, b"a") == [(b"a", b"3", 1, 5, 3)]
    assert [k for k, *_ in get(sm, b"a", 3, b"\0")] == [b"a", b"b"]
    assert [k for k, *_ in get(sm, b"a", 4, b"\0")] == [b"a"]
    resp = sm.range(kv_pb2.RangeRequest(key=b"a", range_end=b"\0", revision=3, limit=1))
    assert (resp.count, resp.more, len(resp.kvs), resp.header.revision) == (2, True, 1, 5)
    resp = sm.range(kv_pb2.RangeRequest(key=b"a", range_end=b"\0", revision=2, count_only=True))
    assert (resp.count, len(resp.kvs)) == (2, 0)


def test_future_and_compacted_revisions_are_refused(sm, log):
    for i in range(5):
        log(cmd(put(b"k", b"%d" % i)))
    with pytest.raises(history.RevisionError, match="future revision"):
        sm.range(kv_pb2.RangeRequest(key=b"k", revision=6))
    assert log(compaction(6)) == ApplyError(ErrorCode.OUT_OF_RANGE, "required revision is a future revision "
                                                                     "(asked for 6, current is 5)")
    assert log(compaction(3)).revision == 5
    assert sm.compact_revision == 3
    with pytest.raises(history.RevisionError, match="required revision has been compacted"):
        sm.range(kv_pb2.RangeRequest(key=b"k", revision=2))
    assert get(sm, b"k", 3) == [(b"k", b"2", 1, 3, 3)]
    err = log(compaction(3))
    assert err.code is ErrorCode.OUT_OF_RANGE and "compacted" in err.message
    out = sm.range_many([kv_pb2.RangeRequest(key=b"k", revision=1), kv_pb2.RangeRequest(key=b"k", revision=4)])
    assert isinstance(out[0], history.RevisionError) and out[1].kvs[0].value == b"3"
    with pytest.raises(history.RevisionError, match="compacted"):
        sm.events(2, 10)


def test_compaction_keeps_the_newest_write_below_and_drops_tombstones(sm, log):
    log(cmd(put(b"a", b"1")), cmd(put(b"a", b"2")), cmd(put(b"b", b"1")), cmd(delete(b"b")))  # 1..4
    log(cmd(put(b"c", b"1")))  # 5
    assert history_size(sm) == (5, 1)
    log(compaction(5))
    assert not sm.compacting
    assert history_size(sm) == (2, 0)  # a@2 and c@5 are all that stays, b's tombstone went with its delete
    assert get(sm, b"a", 5, b"\0") == [(b"a", b"2", 1, 2, 2), (b"c", b"1", 5, 5, 1)]


def test_a_delete_at_the_compacted_revision_goes_with_the_next_compaction(sm, log):
    log(cmd(put(b"a")), cmd(delete(b"a")), cmd(put(b"b")))  # 1, 2, 3
    log(compaction(2))  # the delete at 2 is the newest write <= 2 and a read at 2 needs none: it stays
    assert history_size(sm) == (2, 1)
    assert get(sm, b"a", 2) == [] and get(sm, b"a", 2, b"\0") == []
    log(compaction(3))  # the walk picks up at 2
    assert history_size(sm) == (1, 0)
    assert get(sm, b"a", 3, b"\0") == [(b"b", b"v", 3, 3, 1)]


def test_a_recreated_key_reads_right_on_both_sides_of_its_delete(sm, log):
    log(cmd(put(b"a", b"1")), cmd(delete(b"a"), put(b"a", b"2")), cmd(put(b"a", b"3")))  # 1; 2, 3; 4
    assert [get(sm, b"a", r) for r in (1, 2, 3, 4)] == [
        [(b"a", b"1", 1, 1, 1)], [], [(b"a", b"2", 3, 3, 1)], [(b"a", b"3", 3, 4, 2)]]
    assert [get(sm, b"a", r, b"b") for r in (1, 2)] == [[(b"a", b"1", 1, 1, 1)], []]


def test_an_invalid_command_leaves_no_history(sm, log):
    log(cmd(put(b"a")))
    bad = log(cmd(put(b"b"), put(b"c"), put(b"")))
    assert isinstance(bad, ApplyError)
    assert history_size(sm) == (1, 0)
    assert [ev.key for ev, _ in sm.events(1, 100)[0]] == [b"a"]


def test_events_in_revision_order_with_prev_kv(sm, log):
    log(cmd(put(b"a", b"1")), cmd(put(b"a", b"2")), cmd(delete(b"a")), cmd(txn(put(b"x"), put(b"y"))))
    events, rev = sm.events(1, 100, prev_kv=True)
    assert rev == 4
    got = [(e.revision, e.sub, e.kind, e.key, prev and keys.decode_value(prev.record)) for e, prev in events]
    assert got == [(1, 0, history.PUT, b"a", None), (2, 0, history.PUT, b"a", b"1"),
                   (3, 0, history.DELETE, b"a", b"2"), (4, 0, history.PUT, b"x", None),
                   (4, 1, history.PUT, b"y", None)]
    # a page never splits a revision
    assert [e.revision for e, _ in sm.events(4, 1)[0]] == [4, 4]
    assert [e.revision for e, _ in sm.events(2, 1)[0]] == [2]


def test_hash_covers_history(tmp_path):
    """Two stores with the same latest records but different histories hash differently."""
    a = StateMachine.open(str(tmp_path / "a"), 64 << 20, fsync=False)
    b = StateMachine.open(str(tmp_path / "b"), 64 << 20, fsync=False)
    barrier = command_pb2.Command(hash_barrier=True).SerializeToString()
    try:
        la, lb = Log(a), Log(b)
        la(cmd(put(b"k", b"1")), cmd(put(b"k", b"2")))
        lb(cmd(put(b"k", b"x")), cmd(put(b"k", b"2")))
        assert a.dump() == b.dump()
        assert la(barrier).hash != lb(barrier).hash
    finally:
        a.close()
        b.close()


class Model:
    """The store at every revision, and every write, as the state machine should have them."""

    def __init__(self) -> None:
        self.now: dict[bytes, tuple[bytes, int, int, int]] = {}  # key -> (value, create, mod, version)
        self.at = [dict(self.now)]  # at[rev]: the store at rev
        self.writes: list[tuple[int, bytes, int]] = []  # (revision, key, kind), in history order

    def write(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        """One revision's writes (nothing at all: no revision)."""
        deletes = [k for k in deletes if k in self.now]
        if not puts and not deletes:
            return
        rev = len(self.at)
        for k in deletes:
            del self.now[k]
            self.writes.append((rev, k, history.DELETE))
        for k, v in puts.items():
            old = self.now.get(k)
            self.now[k] = (v, rev, rev, 1) if old is None else (v, old[1], rev, old[3] + 1)
            self.writes.append((rev, k, history.PUT))
        self.at.append(dict(self.now))

    def kept_after_compaction(self, to: int) -> tuple[int, int]:
        """(events, tombstones) left once compaction to `to` is done (etcd's rule, history.py)."""
        later: dict[bytes, int] = {}  # key -> revision of its next write, walking back
        events, tombstones, last_delete_seen = 0, 0, set()
        for rev, k, kind in reversed(self.writes):
            nxt = later.get(k)
            if rev >= to or (kind == history.PUT and (nxt is None or nxt > to)):
                events += 1
                if kind == history.DELETE and k not in last_delete_seen:
                    tombstones += 1
            if kind == history.DELETE:
                last_delete_seen.add(k)
            later[k] = rev
        return events, tombstones


def test_compaction_in_steps_keeps_every_read_right(sm, log, monkeypatch):
    """A model check: random puts, deletes, range deletes, re-creations and txns (several writes
    at one revision); then compactions, each removed a few events per step and the next one
    applied before the last one is done. After every step each readable revision answers as
    the model says it did, and what is left in the end is exactly etcd's rule."""
    monkeypatch.setattr(history, "COMPACT_STEP_EVENTS", 3)
    rnd = random.Random(7)
    keys = [b"k%d" % i for i in range(8)]
    model = Model()
    for _ in range(150):
        k = rnd.choice(keys)
        roll = rnd.random()
        value = b"%d" % rnd.randrange(1000)
        if roll < 0.15:
            log(cmd(delete(k)))
            model.write({}, [k])
        elif roll < 0.25:  # a range delete: one revision, a write per key
            lo, hi = sorted(rnd.sample(range(len(keys) + 1), 2))
            end = keys[hi] if hi < len(keys) else b"l"
            log(cmd(delete(keys[lo], end)))
            model.write({}, keys[lo:hi])
        elif roll < 0.35:  # a delete, then a put of the same key, in one Batch: two revisions
            log(cmd(delete(k), put(k, value)))
            model.write({}, [k])
            model.write({k: value}, [])
        elif roll < 0.5:  # a txn: a delete and two puts at one revision (subs 0..2)
            a, b, c = rnd.sample(keys, 3)
            log(cmd(txn(delete(c), put(a, value), put(b, value + b"'"))))
            model.write({a: value, b: value + b"'"}, [c])
        else:
            log(cmd(put(k, value)))
            model.write({k: value}, [])
    current = sm.revision
    assert current == len(model.at) - 1

    def check(low):
        for rev in range(low, current + 1):
            resp = sm.range(kv_pb2.RangeRequest(key=b"k", range_end=b"l", revision=rev))
            got = {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in resp.kvs}
            assert got == model.at[rev], rev
            for k in keys[:3]:
                one = [(kv.value, kv.create_revision, kv.mod_revision, kv.version)
                       for kv in sm.range(kv_pb2.RangeRequest(key=k, revision=rev)).kvs]
                assert one == ([model.at[rev][k]] if k in model.at[rev] else []), (rev, k)

    check(1)
    for to in (current // 4, current // 3, current // 2, current - 3):
        log(compaction(to))
        steps = 0
        sm.compact_pending()  # one step; the next compaction comes in before this one is done
        assert sm.compacting
        check(to)
    while sm.compacting:
        sm.compact_pending()
        steps += 1
        check(to)
    assert steps > 1  # it did run in steps
    assert history_size(sm) == model.kept_after_compaction(to)


def test_compaction_survives_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "COMPACT_STEP_EVENTS", 2)
    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=False)
    log = Log(sm)
    for i in range(10):
        log(cmd(put(b"k", b"%d" % i)))
    log(compaction(8))
    assert sm.compacting
    sm.close()
    sm = StateMachine.open(path, 64 << 20, fsync=False)
    try:
        assert sm.compacting and sm.compact_revision == 8
        while sm.compacting:
            sm.compact_pending()
        assert history_size(sm) == (3, 0)  # revisions 8, 9, 10
        assert get(sm, b"k", 8) == [(b"k", b"7", 1, 8, 8)]
    finally:
        sm.close()


@pytest.mark.parametrize("old_db", [b"key_revs", b"kv"])
def test_a_store_of_an_older_layout_is_refused(tmp_path, old_db):
    """No migration: a data dir or snapshot image with the key_revs index (before history
    chains) or the kv db (values stored twice) fails clearly, not misread."""
    import lmdb

    from kvstore.storage.state_machine import StoreLayoutError, read_image_meta

    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=False)
    data = sm.data_path
    sm.close()
    env = lmdb.open(str(tmp_path / "sm" / "current"), max_dbs=16)
    env.open_db(old_db)
    env.close()
    with pytest.raises(StoreLayoutError, match=old_db.decode()):
        read_image_meta(data)
    with pytest.raises(StoreLayoutError, match="older version"):
        StateMachine.open(path, 64 << 20, fsync=False)


def test_each_value_is_stored_once(tmp_path):
    """latest holds a 28-byte header per key and no value: 1,000 puts of 8 KiB values take
    3,000 overflow pages (history only), not 6,000 (history and latest)."""
    sm = StateMachine.open(str(tmp_path / "sm"), 256 << 20, fsync=False)
    try:
        log = Log(sm)
        value = bytes(8192)
        for i in range(0, 1000, 100):
            log(cmd(*(put(b"k%04d" % j, value) for j in range(i, i + 100))))
        log(cmd(put(b"k0001", b"new"), txn(put(b"k0002", b"in a txn"))))
        assert get(sm, b"k0001") == [(b"k0001", b"new", 2, 1001, 2)]
        assert get(sm, b"k0002")[0][1] == b"in a txn"
        assert get(sm, b"k0003", 500) == [(b"k0003", value, 4, 4, 1)]
        with sm._env.begin() as t:
            assert {len(v) for _, v in t.cursor(db=sm._latest)} == {28}
            stats = {"latest": t.stat(sm._latest), "history": t.stat(sm._hist)}
        assert stats["latest"]["overflow_pages"] == 0
        assert 1000 * 3 <= stats["history"]["overflow_pages"] <= 1000 * 3 + 10  # 8 KiB + event: 3 pages
    finally:
        sm.close()
