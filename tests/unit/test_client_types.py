"""Request builders and result types."""
from __future__ import annotations

import pytest

from kvstore.client.txn import Txn, create_revision, delete, get, mod_revision, put, range_request, value, version
from kvstore.client.types import prefix_end, to_bytes
from kvstore.v1 import kv_pb2


@pytest.mark.parametrize(
    "prefix,end",
    [(b"a", b"b"), (b"foo/", b"foo0"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0"), (b"ab\xfe", b"ab\xff")],
)
def test_prefix_end(prefix, end):
    assert prefix_end(prefix) == end


def test_to_bytes():
    assert to_bytes("é") == "é".encode()
    assert to_bytes(bytearray(b"x")) == b"x"
    with pytest.raises(TypeError):
        to_bytes(3)  # type: ignore[arg-type]


def test_range_request_shapes():
    assert range_request("k").range_end == b""
    assert range_request("k", prefix=True).range_end == b"l"
    assert range_request("a", "\0").range_end == b"\0"
    with pytest.raises(ValueError):
        range_request("a", "b", prefix=True)


def test_compare_operators_build_compares():
    C = kv_pb2.Compare
    c = value("k") == "v"
    assert (c.target, c.result, c.key, c.value) == (C.VALUE, C.EQUAL, b"k", b"v")
    assert (version("k") > 2).result == C.GREATER and (version("k") > 2).version == 2
    assert (create_revision("k") < 5).create_revision == 5
    assert (mod_revision("k") != 1).result == C.NOT_EQUAL
    with pytest.raises(TypeError):
        version("k") == "not an int"  # noqa: B015


def test_txn_builder_and_nesting():
    inner = Txn().when(version("b") == 0).then(put("b", "1"))
    t = Txn().when(value("a") == "x").then(put("a", "y"), get("p", prefix=True), inner).otherwise(delete("a"))
    pb = t.to_pb()
    assert len(pb.compare) == 1 and len(pb.success) == 3 and len(pb.failure) == 1
    assert pb.success[2].request_txn.compare[0].key == b"b"
    with pytest.raises(TypeError):
        Txn().when("a == x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Txn().then("put a")  # type: ignore[arg-type]


def test_put_and_get_results_read_lazily_behave_like_the_frozen_dataclasses():
    import dataclasses
    import pickle

    from kvstore.client.types import GetResult, KeyValue, PutResult

    r = kv_pb2.RangeResponse()
    r.header.revision = 7
    r.kvs.add(key=b"k", value=b"v", create_revision=2, mod_revision=7, version=3)
    g = GetResult.from_pb(r)
    same = GetResult(7, KeyValue(b"k", b"v", 2, 7, 3))
    assert (g.revision, g.value, g.found, bool(g)) == (7, b"v", True, True)
    assert g == same and hash(g) == hash(same) and repr(g) == repr(same)
    assert pickle.loads(pickle.dumps(g)) == same
    slot = kv_pb2.BatchResult()  # a coalesced op's answer: its slot in the BatchResponse
    slot.response.response_range.CopyFrom(r)
    assert GetResult.from_pb(slot) == same
    missing = GetResult.from_pb(kv_pb2.RangeResponse())
    assert (missing.kv, missing.value, bool(missing)) == (None, None, False)
    assert missing != PutResult(0)  # different types never compare equal

    p = kv_pb2.PutResponse()
    p.header.revision = 9
    p.prev_kv.key = b"k"
    put = PutResult.from_pb(p)
    assert put.revision == 9 and put.prev_kv is not None and put.prev_kv.key == b"k"
    assert PutResult.from_pb(kv_pb2.PutResponse()) == PutResult(0, None)
    assert PutResult.from_pb(kv_pb2.BatchResult(response=kv_pb2.ResponseOp(response_put=p))) == put
    with pytest.raises(dataclasses.FrozenInstanceError):
        put.revision = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.kv = None  # type: ignore[misc]
