"""Scripted checks of the state machine's rules (the model test covers breadth)."""
from __future__ import annotations

import errno
import os
import threading

import lmdb
import pytest

from kvstore.storage.errors import ApplyError, ErrorCode
from kvstore.storage.keys import MAX_KEY_BYTES
from kvstore.storage.plain_puts import PlainPuts
from kvstore.storage.state_machine import DISK_RESERVE_MIN, StateMachine
from kvstore.storage.storage_fault import StorageFault
from kvstore.storage.validation import InvalidRequest, check_op
from kvstore.v1 import command_pb2, kv_pb2

C = kv_pb2.Compare


def put(k, v=b"v", prev=False):
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v, prev_kv=prev))


def delete(k, end=b"", prev=False):
    return kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=k, range_end=end, prev_kv=prev))


def rng(k, end=b"", **kw):
    return kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=k, range_end=end, **kw))


def txn(compare=(), success=(), failure=()):
    return kv_pb2.RequestOp(request_txn=kv_pb2.TxnRequest(compare=compare, success=success, failure=failure))


def cmd(*ops, client=0, seq=0, acked=0, at=1_000, opens=None):
    """A command as a leader stamps it; seq 1 opens its session unless opens=False (a retry)."""
    return command_pb2.Command(
        request_id=kv_pb2.RequestId(
            client_id=client, seq=seq, acked_below=acked, opens_session=seq == 1 if opens is None else opens
        ),
        leader_clock_ms=at, ops=ops,
    ).SerializeToString()


def as_proto(result):
    """A result as the CommandResult message (PlainPuts builds its own)."""
    return result.to_proto() if isinstance(result, PlainPuts) else result


class Log:
    """Feeds commands to a state machine with consecutive indexes."""

    def __init__(self, sm):
        self.sm, self.index = sm, sm.applied_index

    def __call__(self, data):
        self.index += 1
        return self.sm.apply([(self.index, 3, data)])[0]


@pytest.fixture
def sm(tmp_path):
    s = StateMachine.open(str(tmp_path / "sm"), 64 << 20, fsync=False, session_ttl_ms=10_000, max_pending=3)
    yield s
    s.close()


@pytest.fixture
def log(sm):
    return Log(sm)


def test_revision_rules(sm, log):
    assert log(cmd(put(b"a"))).revision == 1
    assert log(cmd(delete(b"missing"))).revision == 1  # nothing deleted: no bump
    r = log(cmd(put(b"b"), put(b"c"), put(b"a", b"2")))  # a batch: one revision per op
    assert [x.response_put.header.revision for x in r.responses] == [2, 3, 4]
    assert r.revision == 4
    assert sm.get(b"a").create_revision == 1 and sm.get(b"a").mod_revision == 4
    assert sm.get(b"a").version == 2
    r = log(cmd(txn(success=[put(b"d"), delete(b"b"), rng(b"a", b"\0")])))  # one txn: one revision
    assert r.revision == 5
    assert sm.get(b"d").mod_revision == 5
    inner = r.responses[0].response_txn.responses
    assert [kv.key for kv in inner[2].response_range.kvs] == [b"a", b"c", b"d"]
    assert all(x.WhichOneof("response") and getattr(x, x.WhichOneof("response")).header.revision == 5 for x in inner)
    assert log(cmd(txn(success=[rng(b"a"), delete(b"zz")]))).revision == 5  # read-only txn
    assert log(cmd(delete(b"a", b"\0"))).responses[0].response_delete_range.deleted == 3
    assert sm.revision == 6 and sm.dump() == {}
    log(cmd(put(b"a")))
    assert sm.get(b"a").version == 1 and sm.get(b"a").create_revision == 7  # recreated


def test_ranges(sm, log):
    log(cmd(*[put(k, k.upper()) for k in (b"a", b"ab", b"abc", b"b", b"c")]))
    r = sm.range(kv_pb2.RangeRequest(key=b"a", range_end=b"b"))
    assert [kv.key for kv in r.kvs] == [b"a", b"ab", b"abc"] and r.count == 3 and not r.more
    r = sm.range(kv_pb2.RangeRequest(key=b"ab", range_end=b"\0", limit=2, keys_only=True))
    assert [kv.key for kv in r.kvs] == [b"ab", b"abc"] and r.more and r.count == 4
    assert all(kv.value == b"" for kv in r.kvs)
    r = sm.range(kv_pb2.RangeRequest(key=b"a", range_end=b"\0", count_only=True))
    assert r.count == 5 and not r.kvs
    assert sm.range(kv_pb2.RangeRequest(key=b"c", range_end=b"a")).count == 0  # end <= key
    assert sm.range(kv_pb2.RangeRequest(key=b"zz")).count == 0
    r = sm.range(kv_pb2.RangeRequest(key=b"b"))
    assert r.kvs[0].value == b"B" and r.header.revision == 5
    with pytest.raises(InvalidRequest):
        sm.range(kv_pb2.RangeRequest(key=b""))


def test_range_many_matches_range(sm, log):
    """One read transaction for many reads: same answers as range(), errors per request."""
    log(cmd(*[put(k, k.upper()) for k in (b"a", b"ab", b"b")]))
    reqs = [
        kv_pb2.RangeRequest(key=b"a", range_end=b"\0", limit=2),
        kv_pb2.RangeRequest(key=b""),
        kv_pb2.RangeRequest(key=b"b", keys_only=True),
        kv_pb2.RangeRequest(key=b"zz"),
    ]
    got = sm.range_many(reqs)
    assert isinstance(got[1], InvalidRequest)
    for i in (0, 2, 3):
        assert got[i] == sm.range(reqs[i])
    batch = kv_pb2.BatchResponse()
    slots = [batch.results.add().response.response_range for _ in range(2)]
    hdr = kv_pb2.ResponseHeader(cluster_id=9, member_id=2, raft_term=4, revision=1)
    out = sm.range_many([reqs[0], reqs[2]], slots, header=hdr, validated=True)
    assert out[0] is slots[0] or out[0] == slots[0]
    assert batch.results[1].response.response_range.kvs[0].key == b"b"
    assert batch.results[0].response.response_range.header == kv_pb2.ResponseHeader(
        cluster_id=9, member_id=2, raft_term=4, revision=3)  # the revision read, not the template's


def test_retry_answer_is_byte_identical(sm, log):
    """A retry gets the original answer's exact bytes, also when stored compactly (plain puts)."""
    log(cmd(put(b"x")))
    cases = [
        cmd(put(b"a"), put(b"b", b"w"), put(b"a", b"v2"), client=5, seq=1, at=2_000),  # puts only: compact
        cmd(put(b"a", prev=True), put(b"c"), client=5, seq=2, at=2_001),  # prev_kv: stored in full
        cmd(put(b"d"), rng(b"a"), client=5, seq=3, at=2_002),  # mixed: stored in full
        cmd(client=6, seq=1, at=2_003),  # no ops at all
    ]
    first = [log(c) for c in cases]
    assert [type(r) for r in first] == [PlainPuts, command_pb2.CommandResult, command_pb2.CommandResult, PlainPuts]
    first = [as_proto(r).SerializeToString() for r in first]
    assert [as_proto(log(c)).SerializeToString() for c in cases] == first
    assert sm.dump_sessions()[5][2][1][:1] == b"P"


def test_compares(sm, log):
    log(cmd(put(b"k", b"m")))

    def holds(**kw):
        r = log(cmd(txn(compare=[C(key=kw.pop("key", b"k"), **kw)])))
        return r.responses[0].response_txn.succeeded

    assert holds(target=C.VALUE, result=C.EQUAL, value=b"m")
    assert holds(target=C.VALUE, result=C.GREATER, value=b"l")
    assert not holds(target=C.VALUE, result=C.NOT_EQUAL, value=b"x", key=b"missing")
    assert holds(target=C.VERSION, result=C.EQUAL, version=0, key=b"missing")
    assert holds(target=C.VERSION, result=C.EQUAL, key=b"missing")  # unset union: 0
    assert holds(target=C.CREATE, result=C.LESS, create_revision=2)
    assert holds(target=C.MOD, result=C.GREATER, mod_revision=0)


def test_exactly_once(sm, log):
    first = log(cmd(put(b"a", b"1", prev=True), client=7, seq=1))
    log(cmd(put(b"a", b"2"), client=8, seq=1))
    again = log(cmd(put(b"a", b"1", prev=True), client=7, seq=1, at=2_000))
    assert again == first and sm.get(b"a").value == b"2" and sm.revision == 2
    # seq 1 acknowledged: its answer is dropped, and a retry of it is refused
    log(cmd(put(b"b"), client=7, seq=2, acked=2))
    assert 1 not in sm.dump_sessions()[7][2]
    err = log(cmd(put(b"a", b"1"), client=7, seq=1, acked=2))
    assert isinstance(err, ApplyError) and err.code is ErrorCode.FAILED_PRECONDITION
    assert sm.get(b"a").value == b"2"
    # client 0: applied every time, nothing recorded
    log(cmd(put(b"z"), at=3_000))
    log(cmd(put(b"z"), at=3_000))
    assert sm.get(b"z").version == 2 and set(sm.dump_sessions()) == {7, 8}


def test_too_many_unacknowledged_answers(sm, log):
    for seq in (1, 2, 3):
        log(cmd(put(b"a"), client=5, seq=seq))
    err = log(cmd(put(b"a"), client=5, seq=4))
    assert err.code is ErrorCode.RESOURCE_EXHAUSTED and "limit is 3" in err.message
    assert sm.get(b"a").version == 3
    assert log(cmd(put(b"a"), client=5, seq=4, acked=2)).revision == 4


def test_sessions_expire_by_log_time(sm, log):
    log(cmd(put(b"a"), client=1, seq=1, at=1_000))  # the leader's first stamp: log time 0
    log(cmd(put(b"b"), client=2, seq=1, at=11_000))  # exactly ttl later: still alive
    assert set(sm.dump_sessions()) == {1, 2} and sm.log_time_ms == 10_000
    log(cmd(put(b"b"), at=11_001))  # any command advances log time
    assert set(sm.dump_sessions()) == {2}
    # a stamp going backwards does not move log time back or revive anything
    log(cmd(put(b"c"), at=500))
    assert sm.log_time_ms == 10_001
    # the expired client comes back: refused, not re-applied
    err = log(cmd(put(b"a"), client=1, seq=2, acked=2, at=11_002))
    assert err.code is ErrorCode.FAILED_PRECONDITION and err.message.startswith("session expired")
    assert sm.get(b"a").version == 1 and 1 not in sm.dump_sessions()


def _apply_both_ways(tmp_path, datas):
    """Apply datas one entry per apply, and all in one apply: (answers, state) of each."""
    out = []
    for name, batched in (("one", False), ("batch", True)):
        s = StateMachine.open(str(tmp_path / name), 64 << 20, fsync=False, session_ttl_ms=10_000, max_pending=3)
        entries = [(i + 1, 3, d) for i, d in enumerate(datas)]
        if batched:
            answers = s.apply(entries)
        else:
            answers = [s.apply([e])[0] for e in entries]
        out.append((answers, s.dump(), s.revision, s.dump_sessions()))
        s.close()
    return out


def test_one_batch_expires_and_revives_sessions_like_one_by_one(tmp_path):
    """Sessions touched earlier in the same apply batch expire, come back and count answers
    exactly as when every command is applied on its own (the batch keeps them in memory)."""
    datas = [
        cmd(put(b"a"), client=1, seq=1, at=1_000),
        cmd(put(b"b"), client=2, seq=1, at=1_000),
        cmd(put(b"b"), client=2, seq=2, acked=2, at=5_000),
        cmd(put(b"c"), client=3, seq=1, at=11_001),  # client 1 (seen at 1_000) expires here
        cmd(put(b"a"), client=1, seq=2, acked=2, at=11_002),  # refused: its session is gone
        cmd(put(b"a"), client=1, seq=1, acked=1, at=11_003),  # a new session under the same id
        cmd(put(b"a"), client=1, seq=1, acked=1, at=11_004),  # its retry: the stored answer
        cmd(put(b"b"), client=2, seq=3, acked=3, at=15_001),  # client 2 (seen at 5_000) still alive
        cmd(put(b"d"), client=4, seq=1, at=25_002),  # everyone but client 4 expires
    ]
    one, batch = _apply_both_ways(tmp_path, datas)
    assert one == batch
    answers, _kv, _rev, sessions = batch
    assert answers[4].code is ErrorCode.FAILED_PRECONDITION
    assert answers[6] == answers[5]
    assert set(sessions) == {4}


def test_one_batch_drops_acknowledged_answers_like_one_by_one(tmp_path):
    """acked_below moving by one (deleted key by key) and by many (a cursor walk) in one batch."""
    datas = [cmd(put(b"k%d" % q), client=9, seq=q, acked=max(1, q - 2), at=1_000 + q) for q in range(1, 40)]
    datas.append(cmd(put(b"z"), client=9, seq=200, acked=200, at=2_000))
    one, batch = _apply_both_ways(tmp_path, datas)
    assert one == batch
    last_seen, acked, answers = batch[3][9]
    assert (last_seen, acked, set(answers)) == (2_000 - 1_001, 200, {200})  # log time 0 at the first stamp


def test_invalid_command_applies_nothing(sm, log):
    r = log(cmd(put(b"a"), put(b""), client=3, seq=1))
    assert isinstance(r, ApplyError) and r.code is ErrorCode.INVALID_ARGUMENT
    assert r.message == "op 1: key is empty"
    assert sm.dump() == {} and sm.revision == 0 and sm.applied_index == 1
    assert log(cmd(put(b"a"), put(b""), client=3, seq=1)) == r  # the stored answer
    long_key = b"k" * (MAX_KEY_BYTES + 1)
    assert f"limit is {MAX_KEY_BYTES}" in log(cmd(put(long_key))).message
    assert log(b"\xff\xff").code is ErrorCode.INVALID_ARGUMENT
    assert log(cmd(put(b"a"), client=3, seq=0)).code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad, why", [
    (txn(success=[put(b"a"), put(b"a")]), "duplicate key"),
    (txn(failure=[put(b"b"), delete(b"a", b"c")]), "both put and deleted"),
    (txn(success=[put(b"a"), txn(success=[put(b"a")])]), "duplicate key"),
    (txn(compare=[C(key=b"a", target=C.VERSION, value=b"x")]), "but value given"),
    (kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"a", lease=-3)), "lease must be >= 0"),
])
def test_txn_validation(bad, why):
    with pytest.raises(InvalidRequest, match=why):
        check_op(bad)


def test_nested_branches_are_alternatives():
    check_op(txn(success=[txn(success=[put(b"a")], failure=[put(b"a"), delete(b"b")])]))


def test_replay_after_reopen_is_skipped(tmp_path):
    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=True)
    entries = [(1, 1, b""), (2, 1, cmd(put(b"a"))), (3, 2, cmd(put(b"a")))]
    assert sm.apply(entries)[0] is None
    sm.close()
    sm = StateMachine.open(path, 64 << 20)
    assert (sm.applied_index, sm.applied_term, sm.revision) == (3, 2, 2)
    assert sm.apply(entries + [(4, 2, cmd(put(b"b")))])[:3] == [None, None, None]
    assert sm.get(b"a").version == 2 and sm.revision == 3
    sm.close()


def test_environment_failure_raises_and_changes_nothing(tmp_path):
    sm = StateMachine.open(str(tmp_path / "sm"), 1 << 20, fsync=False)
    Log(sm)(cmd(put(b"a")))
    with pytest.raises(StorageFault, match=r"LMDB commit .*/data.mdb: .*MDB_MAP_FULL") as err:
        sm.apply([(2, 1, cmd(put(b"big", b"x" * (2 << 20))))])
    assert isinstance(err.value.__cause__, lmdb.MapFullError)
    assert (sm.applied_index, sm.revision) == (1, 1) and set(sm.dump()) == {b"a"}
    assert Log(sm)(cmd(put(b"b"))).revision == 2
    sm.close()


def test_retry_after_reopen_gets_the_stored_answer(tmp_path):
    """The lookup of a retried seq is skipped only above the highest stored seq, which a
    reopened state machine first reads back from LMDB (here: answers of clients 4 and 5,
    and client 6 whose answers sort after them)."""
    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=10_000, max_pending=3)
    log = Log(sm)
    first = {(c, q): log(cmd(put(b"k%d" % c), client=c, seq=q, at=1_000 + q)) for c in (4, 5) for q in (1, 2, 3)}
    log(cmd(put(b"z"), client=6, seq=1, at=1_009))
    log(cmd(put(b"z"), client=6, seq=9, at=1_010))
    assert set(sm.dump_sessions()[6][2]) == {1, 9}
    sm.close()
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=10_000, max_pending=3)
    log = Log(sm)
    for c in (5, 4):
        assert log(cmd(put(b"k%d" % c), client=c, seq=2, at=1_020)) == first[(c, 2)]
        assert log(cmd(put(b"k%d" % c), client=c, seq=3, at=1_021)) == first[(c, 3)]
    assert sm.get(b"k4").version == 3 and sm.get(b"k5").version == 3  # nothing applied twice
    sm.close()


def test_plain_puts_answer_without_messages_until_asked(log):
    """A command of plain puts returns PlainPuts; any other op makes the messages of the
    puts before it (their revisions follow on) and of everything after."""
    r = log(cmd(put(b"p1"), put(b"p2"), put(b"p1", b"again")))
    assert isinstance(r, PlainPuts) and (r.n, r.first_revision, r.revision) == (3, 1, 3)
    assert [x.response_put.header.revision for x in r.responses] == [1, 2, 3]
    mixed = log(cmd(put(b"p3"), put(b"p4"), put(b"p1", b"third", prev=True), rng(b"p1"), put(b"p5")))
    assert isinstance(mixed, command_pb2.CommandResult) and mixed.revision == 7
    assert [x.response_put.header.revision for x in mixed.responses[:3]] == [4, 5, 6]
    assert mixed.responses[2].response_put.prev_kv.value == b"again"
    assert mixed.responses[3].response_range.kvs[0].value == b"third"
    assert mixed.responses[4].response_put.header.revision == 7


def test_unsynced_state_machine_allocates_disk_ahead_of_its_pages(tmp_path):
    """fsync=False maps the file writable (MDB_WRITEMAP): a page written into a hole of the
    sparse file on a full disk would kill the process, so disk is allocated before writing."""
    sm = StateMachine.open(str(tmp_path / "sm"), 64 << 20, fsync=False)
    Log(sm)(cmd(*[put(b"k%04d" % i, b"v" * 200) for i in range(500)]))
    st = os.stat(os.path.join(str(tmp_path / "sm"), "current", "data.mdb"))
    assert st.st_size == 64 << 20  # sparse, as large as the map
    assert st.st_blocks * 512 >= sm.db_size() + DISK_RESERVE_MIN // 2
    sm.close()


def test_a_full_disk_fails_the_apply_before_anything_is_written(tmp_path, monkeypatch):
    sm = StateMachine.open(str(tmp_path / "sm"), 1 << 30, fsync=False)
    log = Log(sm)
    log(cmd(put(b"a")))

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="No space left"):
        sm.apply([(2, 1, cmd(*[put(b"k%06d" % i, b"v" * 300) for i in range(200_000)]))])
    assert (sm.applied_index, sm.revision, set(sm.dump())) == (1, 1, {b"a"})
    sm.close()


@pytest.mark.parametrize("bad_op, why", [
    (put(b""), "key is empty"),
    (kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"z", lease=-5)), "lease must be >= 0"),
    (delete(b""), "key is empty"),
    (txn(success=[put(b"q"), put(b"q")]), "duplicate key"),
])
def test_an_invalid_op_after_puts_that_ran_undoes_them(sm, log, bad_op, why):
    """Puts are checked as they run; a bad op after some (a put, or another kind,
    which has the whole command checked) undoes them, the same key twice included."""
    log(cmd(put(b"a", b"old")))
    before = sm.dump()
    r = log(cmd(put(b"a", b"new"), put(b"b"), put(b"a", b"newer"), bad_op, put(b"c"), client=4, seq=1))
    assert isinstance(r, ApplyError) and r.code is ErrorCode.INVALID_ARGUMENT
    assert r.message.startswith("op 3: ") and why in r.message
    assert sm.dump() == before and sm.revision == 1
    assert log(cmd(put(b"d"))).revision == 2  # and the revision count goes on from there


def test_a_checkpoint_lets_go_of_the_write_lock_while_an_image_is_streamed(tmp_path, monkeypatch):
    """The checkpoint holds LMDB's write lock while it pins the base, and an apply that comes then
    waits for it. py-lmdb's abort() of a write transaction first waits until no LMDB call is in
    flight: a snapshot image being copied to a follower is one, and its copy goes on only as the
    event loop sends what it copied. With the apply on the loop waiting for the lock, releasing it
    by abort() deadlocked (a leader stopped for good, mid-test). Release is by commit()."""
    sm = StateMachine.open(str(tmp_path / "sm"), 64 << 20, fsync=False)
    log = Log(sm)
    for i in range(200):  # an image far bigger than a pipe's buffer: its copy waits for its reader
        log(cmd(put(b"k%03d" % i, os.urandom(10_000))))
    _index, _term, image = sm.open_image()
    assert len(image.read(4096)) == 4096  # the copy is under way, and stays blocked on the pipe
    real_pread = os.pread
    applier: list[threading.Thread] = []

    def pread_with_an_apply_waiting(fd, n, offset):
        if not applier:  # the checkpoint's read of the meta pages: it holds the write lock now
            t = threading.Thread(target=log, args=(cmd(put(b"b")),), daemon=True)
            applier.append(t)
            t.start()
            t.join(0.5)  # it cannot finish (the lock is ours): this only gives it time to start waiting
            assert t.is_alive(), "the apply did not wait for the checkpoint's write lock"
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread_with_an_apply_waiting)
    checkpoint = threading.Thread(target=sm.checkpoint, daemon=True)
    checkpoint.start()
    checkpoint.join(10)
    stuck = checkpoint.is_alive()
    image.close()  # the copy ends (EPIPE): a deadlocked checkpoint would go on from here
    checkpoint.join(10)
    applier[0].join(10)
    monkeypatch.undo()
    assert not stuck, "the checkpoint waited for the image's copy while holding the write lock"
    assert not applier[0].is_alive(), "the apply never got the write lock"
    assert sm.applied_index == 201
    sm.close()
