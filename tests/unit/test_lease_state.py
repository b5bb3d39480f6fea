"""Leases in the state machine: grant, attach, revoke (keys deleted at one revision), and refusals."""
from __future__ import annotations

import pytest

from kvstore.storage.errors import ApplyError, ErrorCode
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

from tests.unit.test_state_machine import Log, cmd, delete, put, rng, txn


def lput(k, lease, v=b"v", prev=False):
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v, lease=lease, prev_kv=prev))


def grant(lease_id, ttl=10):
    change = command_pb2.LeaseChange(grant=command_pb2.LeaseGrant(id=lease_id, ttl=ttl))
    return command_pb2.Command(lease=change, leader_clock_ms=1_000).SerializeToString()


def revoke(lease_id):
    return command_pb2.Command(lease=command_pb2.LeaseChange(revoke=lease_id), leader_clock_ms=1_000).SerializeToString()


@pytest.fixture
def sm(tmp_path):
    s = StateMachine.open(str(tmp_path / "sm"), 64 << 20, fsync=False, session_ttl_ms=10_000, max_pending=3)
    yield s
    s.close()


@pytest.fixture
def log(sm):
    return Log(sm)


def test_grant_put_range_revoke(sm, log):
    assert not isinstance(log(grant(7, ttl=30)), ApplyError)
    assert sm.leases == {7: 30}
    log(cmd(lput(b"a", 7), put(b"b"), lput(b"c", 7)))
    assert sm.get(b"a").lease == 7 and sm.get(b"b").lease == 0
    r = sm.range(kv_pb2.RangeRequest(key=b"a", range_end=b"z"))
    assert [(kv.key, kv.lease) for kv in r.kvs] == [(b"a", 7), (b"b", 0), (b"c", 7)]
    assert sm.lease_keys(7) == [b"a", b"c"]
    before = sm.revision
    res = log(revoke(7))
    assert not isinstance(res, ApplyError)
    assert res.revision == before + 1  # both keys deleted at one revision
    assert set(sm.dump()) == {b"b"}
    assert sm.leases == {} and sm.lease_keys(7) == []


def test_put_with_unknown_lease_is_not_found_and_nothing_applies(sm, log):
    log(cmd(put(b"a", b"old")))
    before = (sm.dump(), sm.revision)
    r = log(cmd(put(b"a", b"new"), put(b"b"), lput(b"c", 99), client=4, seq=1))
    assert isinstance(r, ApplyError) and r.code is ErrorCode.NOT_FOUND and "lease not found" in r.message
    assert (sm.dump(), sm.revision) == before
    r = log(cmd(txn(success=[put(b"x")], failure=[lput(b"y", 5)])))  # either branch
    assert isinstance(r, ApplyError) and r.code is ErrorCode.NOT_FOUND
    assert (sm.dump(), sm.revision) == before


def test_overwrite_and_delete_detach(sm, log):
    log(grant(1))
    log(grant(2))
    log(cmd(lput(b"a", 1), lput(b"b", 1), lput(b"c", 1)))
    log(cmd(lput(b"a", 2)))  # moved to lease 2
    r = log(cmd(put(b"b", prev=True)))  # a put without a lease detaches (etcd)
    assert r.responses[0].response_put.prev_kv.lease == 1
    r = log(cmd(delete(b"c", prev=True)))
    assert r.responses[0].response_delete_range.prev_kvs[0].lease == 1
    assert sm.lease_keys(1) == [] and sm.lease_keys(2) == [b"a"]
    log(revoke(1))
    assert set(sm.dump()) == {b"a", b"b"}
    log(revoke(2))
    assert set(sm.dump()) == {b"b"}


def test_lease_in_txn_and_range_inside_txn(sm, log):
    log(grant(3))
    r = log(cmd(txn(compare=[kv_pb2.Compare(key=b"k", target=kv_pb2.Compare.CREATE, create_revision=0)],
                    success=[lput(b"k", 3), rng(b"k")])))
    assert r.responses[0].response_txn.succeeded
    assert r.responses[0].response_txn.responses[1].response_range.kvs[0].lease == 3


def test_grant_twice_and_revoke_unknown(sm, log):
    log(grant(4))
    r = log(grant(4))
    assert isinstance(r, ApplyError) and r.code is ErrorCode.FAILED_PRECONDITION and "already exists" in r.message
    r = log(revoke(5))
    assert isinstance(r, ApplyError) and r.code is ErrorCode.NOT_FOUND


def test_leases_survive_reopen(tmp_path):
    path = str(tmp_path / "sm")
    s = StateMachine.open(path, 64 << 20, fsync=False)
    lg = Log(s)
    lg(grant(8, ttl=60))
    lg(cmd(lput(b"q", 8)))
    s.close()
    s = StateMachine.open(path, 64 << 20, fsync=False)
    try:
        assert s.leases == {8: 60} and s.get(b"q").lease == 8 and s.lease_keys(8) == [b"q"]
    finally:
        s.close()


def test_a_failed_batch_does_not_show_its_leases(sm, log, monkeypatch):
    """The in-memory lease list moves on only once the apply transaction committed."""
    def boom(results):
        raise OSError("commit failed")
    with pytest.raises(OSError):
        sm.apply([(1, 1, grant(9))], before_commit=boom)
    assert sm.leases == {}


def test_a_revoke_is_recorded_in_history_as_deletes_at_one_revision(sm, log):
    """Watchers see a lease's keys go: one DELETE event each, all at the revoke's revision."""
    from kvstore.storage import history

    log(grant(6))
    log(cmd(lput(b"w/a", 6), lput(b"w/b", 6)))
    res = log(revoke(6))
    events, _ = sm.events(res.revision, 10)
    assert [(ev.kind, ev.key, ev.revision) for ev, _prev in events] == [
        (history.DELETE, b"w/a", res.revision), (history.DELETE, b"w/b", res.revision)]


def test_plain_puts_beside_leased_keys(sm, log):
    """Puts to keys without a lease stay on the inline path; one over a leased key detaches it, and
    an invalid command undoes the puts before it, leases included."""
    log(grant(2))
    log(cmd(lput(b"a", 2)))
    before = (sm.dump(), sm.revision, sm.lease_keys(2))
    r = log(cmd(put(b"b"), put(b"a", b"plain"), delete(b""), client=5, seq=1))
    assert isinstance(r, ApplyError) and r.code is ErrorCode.INVALID_ARGUMENT
    assert (sm.dump(), sm.revision, sm.lease_keys(2)) == before
    log(cmd(put(b"b"), put(b"a", b"plain"), put(b"c")))
    assert sm.get(b"a").lease == 0 and sm.lease_keys(2) == []
    log(revoke(2))
    assert set(sm.dump()) == {b"a", b"b", b"c"}  # a left the lease before it was revoked


def test_a_snapshot_carries_leases_and_their_keys(tmp_path):
    """A follower installing an image gets the leases and attachments (the new leader's clocks start
    from what it holds)."""
    a = StateMachine.open(str(tmp_path / "a"), 64 << 20, fsync=False)
    b = StateMachine.open(str(tmp_path / "b"), 64 << 20, fsync=False)
    try:
        lg = Log(a)
        lg(grant(11, ttl=15))
        lg(cmd(lput(b"s/k", 11)))
        image = tmp_path / "image.mdb"
        with open(image, "wb") as f:
            a.copy_to(f.fileno())
        b.install_snapshot(str(image))
        assert b.leases == {11: 15} and b.lease_keys(11) == [b"s/k"] and b.get(b"s/k").lease == 11
    finally:
        a.close()
        b.close()


def test_history_keeps_each_versions_lease(sm, log):
    """KeyValue.lease at an old revision and in watch events (and their prev_kv) is the lease
    the key had then, not 0 and not today's."""
    from kvstore.server.watch_service import to_event
    from kvstore.storage import history

    log(grant(5))
    r1 = log(cmd(lput(b"a", 5), lput(b"b", 5))).revision  # a at r1 - 1, b at r1
    r2 = log(cmd(put(b"a", b"plain"))).revision  # a leaves the lease
    r3 = log(cmd(delete(b"b"))).revision
    log(cmd(put(b"c")))

    def leases_at(rev):
        return [(kv.key, kv.lease) for kv in sm.range(kv_pb2.RangeRequest(key=b"a", range_end=b"z", revision=rev)).kvs]

    assert leases_at(r1) == [(b"a", 5), (b"b", 5)]  # a from history, b from history too (deleted since)
    assert leases_at(r2) == [(b"a", 0), (b"b", 5)]
    assert leases_at(r3) == [(b"a", 0)]
    assert sm.range(kv_pb2.RangeRequest(key=b"b", revision=r2)).kvs[0].lease == 5
    log(cmd(lput(b"d", 5)))
    r4 = log(cmd(put(b"e"))).revision
    assert [kv.lease for kv in sm.range(kv_pb2.RangeRequest(key=b"d", revision=r4)).kvs] == [5]  # kv's record

    events, _ = sm.events(r1 - 1, 100, prev_kv=True)
    got = [to_event(ev, prev) for ev, prev in events]
    assert [(e.kv.key, e.kv.lease, e.prev_kv.lease) for e in got] == [
        (b"a", 5, 0), (b"b", 5, 0), (b"a", 0, 5), (b"b", 0, 5), (b"c", 0, 0), (b"d", 5, 0), (b"e", 0, 0)]
    assert [e.type for e in got][3] == history.DELETE
