"""The client API of real nodes: reads, writes, txns, batches, redirects, bad input."""
from __future__ import annotations

import socket

import grpc
import pytest

from kvstore.v1 import cluster_pb2, kv_pb2

from server_cluster import cluster_stub, kv_stub, settled, trailing

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20


def put_op(key: bytes, value: bytes) -> kv_pb2.RequestOp:
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=key, value=value))


def test_put_get_range_delete(cluster):
    leader = settled(cluster)
    kv = kv_stub(cluster.client_addr(leader))
    r1 = kv.Put(kv_pb2.PutRequest(key=b"fruit/apple", value=b"red"), timeout=10)
    assert r1.header.member_id == leader and r1.header.raft_term >= 1 and r1.header.revision >= 1
    kv.Put(kv_pb2.PutRequest(key=b"fruit/banana", value=b"yellow"), timeout=10)
    r3 = kv.Put(kv_pb2.PutRequest(key=b"fruit/apple", value=b"green", prev_kv=True), timeout=10)
    assert r3.prev_kv.value == b"red" and r3.header.revision > r1.header.revision

    got = kv.Range(kv_pb2.RangeRequest(key=b"fruit/apple"), timeout=10)
    assert [(x.key, x.value, x.version) for x in got.kvs] == [(b"fruit/apple", b"green", 2)]
    assert got.header.revision == r3.header.revision
    assert (r3.header.cluster_id, r3.header.member_id, r3.header.raft_term) == (
        got.header.cluster_id, got.header.member_id, got.header.raft_term)  # a write's header is a read's

    everything = kv.Range(kv_pb2.RangeRequest(key=b"fruit/", range_end=b"fruit0"), timeout=10)
    assert [x.key for x in everything.kvs] == [b"fruit/apple", b"fruit/banana"]
    limited = kv.Range(kv_pb2.RangeRequest(key=b"fruit/", range_end=b"fruit0", limit=1, keys_only=True), timeout=10)
    assert len(limited.kvs) == 1 and limited.more and limited.kvs[0].value == b""
    counted = kv.Range(kv_pb2.RangeRequest(key=b"fruit/", range_end=b"fruit0", count_only=True), timeout=10)
    assert counted.count == 2 and not counted.kvs
    from_key = kv.Range(kv_pb2.RangeRequest(key=b"fruit/b", range_end=b"\0"), timeout=10)
    assert b"fruit/banana" in [x.key for x in from_key.kvs]

    d = kv.DeleteRange(kv_pb2.DeleteRangeRequest(key=b"fruit/", range_end=b"fruit0", prev_kv=True), timeout=10)
    assert d.deleted == 2 and {x.key for x in d.prev_kvs} == {b"fruit/apple", b"fruit/banana"}
    assert not kv.Range(kv_pb2.RangeRequest(key=b"fruit/apple"), timeout=10).kvs


def test_txn_compare_and_swap(cluster):
    leader = settled(cluster)
    kv = kv_stub(cluster.client_addr(leader))
    kv.Put(kv_pb2.PutRequest(key=b"lock", value=b"free"), timeout=10)

    def cas(expect: bytes, new: bytes) -> kv_pb2.TxnResponse:
        return kv.Txn(kv_pb2.TxnRequest(
            compare=[kv_pb2.Compare(key=b"lock", target=kv_pb2.Compare.VALUE,
                                    result=kv_pb2.Compare.EQUAL, value=expect)],
            success=[put_op(b"lock", new)],
            failure=[kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=b"lock"))],
        ), timeout=10)

    ok = cas(b"free", b"mine")
    assert ok.succeeded and ok.header.member_id == leader
    lost = cas(b"free", b"theirs")
    assert not lost.succeeded  # a failed compare is a result, not an error
    assert lost.responses[0].response_range.kvs[0].value == b"mine"


def get_op(key: bytes) -> kv_pb2.RequestOp:
    return kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=key))


def test_batch_with_one_bad_op(cluster):
    leader = settled(cluster)
    kv = kv_stub(cluster.client_addr(leader))
    resp = kv.Batch(kv_pb2.BatchRequest(ops=[
        put_op(b"batch/a", b"1"),
        put_op(b"", b"empty key"),
        put_op(b"batch/b", b"2"),
        kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=b"batch/", range_end=b"batch0")),
        put_op(b"batch/" + b"k" * 600, b"long key"),
        put_op(b"batch/big", b"v" * ((1 << 20) + 1)),
        kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"batch/lease", value=b"x", lease=-7)),
        get_op(b"batch/absent"),
        get_op(b""),
        get_op(b"batch/" + b"k" * 600),
        kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=b"batch/a", limit=-1)),
    ]), timeout=10)
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["response", "error", "response", "response", "error", "error", "error",
                     "response", "error", "error", "error"]
    assert {r.error.code for r in resp.results if r.WhichOneof("result") == "error"} == \
        {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    assert "key must not be empty" in resp.results[1].error.message
    assert "--max-key-bytes" in resp.results[4].error.message
    assert "--max-value-bytes" in resp.results[5].error.message
    assert "lease" in resp.results[6].error.message
    assert resp.results[7].response.response_range.count == 0
    assert "key must not be empty" in resp.results[8].error.message
    assert "--max-key-bytes" in resp.results[9].error.message
    assert "limit is -1" in resp.results[10].error.message
    got = kv.Range(kv_pb2.RangeRequest(key=b"batch/", range_end=b"batch0"), timeout=10)
    assert [(x.key, x.value) for x in got.kvs] == [(b"batch/a", b"1"), (b"batch/b", b"2")]


def test_a_member_reads_its_own_answered_writes(cluster):
    """Writers are answered before LMDB commits; a serializable read on the same member must still see them."""
    kv = kv_stub(cluster.client_addr(settled(cluster)))
    for i in range(150):
        value = b"v%d" % i
        if i % 2:
            kv.Put(kv_pb2.PutRequest(key=b"ryw", value=value), timeout=10)
        else:
            kv.Batch(kv_pb2.BatchRequest(ops=[put_op(b"ryw", value)]), timeout=10)
        got = kv.Range(kv_pb2.RangeRequest(key=b"ryw", serializable=True), timeout=10)
        assert [kv_.value for kv_ in got.kvs] == [value], f"write {i} was answered but not visible on the leader"


def test_redirect_from_each_follower(cluster):
    leader = settled(cluster)
    leader_addr = cluster.client_addr(leader)
    kv_stub(leader_addr).Put(kv_pb2.PutRequest(key=b"redirect", value=b"x"), timeout=10)
    for f in [i for i in cluster.ids if i != leader]:
        kv = kv_stub(cluster.client_addr(f))
        for call in (
            lambda kv=kv: kv.Put(kv_pb2.PutRequest(key=b"redirect", value=b"y"), timeout=10),
            lambda kv=kv: kv.Range(kv_pb2.RangeRequest(key=b"redirect"), timeout=10),  # linearizable
            lambda kv=kv: kv.Txn(kv_pb2.TxnRequest(success=[put_op(b"redirect", b"z")]), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == f"not leader: leader is member {leader} at {leader_addr}"
            md = trailing(e.value)
            assert md["kvstore-leader-id"] == str(leader)
            assert md["kvstore-leader-addr"] == leader_addr
            assert md["kvstore-not-applied"] == "1"
        # serializable reads are served by any member
        local = kv.Range(kv_pb2.RangeRequest(key=b"redirect", serializable=True), timeout=10)
        assert local.header.member_id == f
    assert kv_stub(leader_addr).Range(kv_pb2.RangeRequest(key=b"redirect"), timeout=10).kvs[0].value == b"x"


def expect_invalid(call, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for frag in fragments:
        assert frag in e.value.details()
    assert trailing(e.value).get("kvstore-not-applied") == "1"


def test_bad_input_is_refused_and_harms_nobody(cluster):
    leader = settled(cluster)
    addr = cluster.client_addr(leader)
    kv = kv_stub(addr)
    before = kv.Range(kv_pb2.RangeRequest(key=b"\0", range_end=b"\0", count_only=True), timeout=10).header.revision

    expect_invalid(lambda: kv.Put(kv_pb2.PutRequest(key=b"k" * 5000, value=b"v"), timeout=10),
                   "key is 5000 bytes; the limit is 511 (--max-key-bytes)")
    expect_invalid(lambda: kv.Put(kv_pb2.PutRequest(key=b"big", value=b"v" * (MiB + 1)), timeout=10),
                   f"value is {MiB + 1} bytes; the limit is {MiB} (--max-value-bytes)")
    expect_invalid(lambda: kv.Put(kv_pb2.PutRequest(key=b"", value=b"v"), timeout=10), "key must not be empty")
    expect_invalid(lambda: kv.Range(kv_pb2.RangeRequest(key=b""), timeout=10), "key must not be empty")
    expect_invalid(
        lambda: kv.Txn(kv_pb2.TxnRequest(success=[put_op(b"t%d" % i, b"v") for i in range(129)]), timeout=10),
        "txn has 129 success ops; the limit is 128 (--max-txn-ops)")
    expect_invalid(lambda: kv.Range(kv_pb2.RangeRequest(key=b"b", range_end=b"a"), timeout=10), "inverted range")
    expect_invalid(lambda: kv.DeleteRange(kv_pb2.DeleteRangeRequest(key=b"b", range_end=b"a"), timeout=10),
                   "inverted range")
    expect_invalid(
        lambda: kv.Txn(kv_pb2.TxnRequest(success=[put_op(b"r1", b"v" * MiB), put_op(b"r2", b"v" * MiB)]),
                       timeout=10),
        "the limit is 1572864 (--max-request-bytes)")
    expect_invalid(
        lambda: kv.Batch(kv_pb2.BatchRequest(ops=[put_op(b"b", b"v")] * 1025), timeout=10),
        "batch has 1025 ops; the limit is 1024 (--max-batch-ops)")

    # garbage bytes on the client port and on every peer port: the connection is dropped, nothing else happens
    targets = [addr] + [cluster.peer_addr(i) for i in cluster.ids]
    junks = (b"\x00\xff" * 4096, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xde\xad\xbe\xef" * 1000,
             b"KVPEER01\x01" + b"\xff" * 64)
    for target, junk in ((t, j) for t in targets for j in junks):
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(junk)
                s.settimeout(2)
                s.recv(1024)
            except OSError:
                pass

    after = kv.Range(kv_pb2.RangeRequest(key=b"\0", range_end=b"\0", count_only=True), timeout=10).header.revision
    assert after == before, "a refused request changed the store"
    assert all(cluster.is_running(i) for i in cluster.ids)
    assert kv.Put(kv_pb2.PutRequest(key=b"still", value=b"fine"), timeout=10).header.revision == before + 1
    assert settled(cluster) == leader


def test_status_reports_real_figures(cluster):
    leader = settled(cluster)
    st = cluster_stub(cluster.client_addr(leader)).Status(cluster_pb2.StatusRequest(), timeout=10)
    assert st.role == "leader" and st.leader_id == leader and st.member_id == leader
    assert st.commit_index >= st.applied_index > 0
    assert st.wal_size > 0 and st.db_size > 0 and st.version
    members = cluster_stub(cluster.client_addr(leader)).MemberList(cluster_pb2.MemberListRequest(), timeout=10)
    assert {m.id: m.client_urls[0] for m in members.members} == cluster.client_addrs
