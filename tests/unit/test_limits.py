"""limits: each violation is refused with a message naming the limit, its flag and the value."""
import pytest

from kvstore.server.limits import InvalidRequest, Limits, is_mutation
from kvstore.v1 import kv_pb2

L = Limits()


def put(key=b"k", value=b"v"):
    return kv_pb2.PutRequest(key=key, value=value)


def test_key_too_long_names_flag_and_size():
    with pytest.raises(InvalidRequest, match=r"key is 5000 bytes; the limit is 511 \(--max-key-bytes\)"):
        L.check_put(put(key=b"k" * 5000))


def test_value_too_long():
    with pytest.raises(InvalidRequest, match=r"value is 1048577 bytes; the limit is 1048576 \(--max-value-bytes\)"):
        L.check_put(put(value=b"v" * (1 << 20 | 1)))


def test_value_at_limit_is_fine():
    L.check_put(put(value=b"v" * (1 << 20)))


def test_empty_key():
    with pytest.raises(InvalidRequest, match="key must not be empty"):
        L.check_put(put(key=b""))


def test_inverted_range():
    with pytest.raises(InvalidRequest, match="inverted range"):
        L.check_range_request(kv_pb2.RangeRequest(key=b"b", range_end=b"a"))


@pytest.mark.parametrize("end", [b"", b"\0", b"c"])
def test_valid_ranges(end):
    L.check_range_request(kv_pb2.RangeRequest(key=b"b", range_end=end))


def test_request_size():
    small = Limits(max_request_bytes=100)
    with pytest.raises(InvalidRequest, match=r"the limit is 100 \(--max-request-bytes\)"):
        small.check_request_size(put(value=b"v" * 200))


def test_too_many_txn_ops():
    ops = [kv_pb2.RequestOp(request_put=put(key=b"k%d" % i)) for i in range(129)]
    with pytest.raises(InvalidRequest, match=r"txn has 129 success ops; the limit is 128 \(--max-txn-ops\)"):
        L.check_txn(kv_pb2.TxnRequest(success=ops))


def test_nested_txn_checked():
    inner = kv_pb2.TxnRequest(success=[kv_pb2.RequestOp(request_put=put(key=b""))])
    with pytest.raises(InvalidRequest, match="key must not be empty"):
        L.check_op(kv_pb2.RequestOp(request_txn=inner))


def test_too_many_batch_ops():
    req = kv_pb2.BatchRequest(ops=[kv_pb2.RequestOp(request_put=put())] * 1025)
    with pytest.raises(InvalidRequest, match=r"batch has 1025 ops; the limit is 1024 \(--max-batch-ops\)"):
        L.check_batch_size(req)


def test_empty_op():
    with pytest.raises(InvalidRequest, match="operation is empty"):
        L.check_op(kv_pb2.RequestOp())


def test_is_mutation():
    assert not is_mutation(kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=b"a")))
    assert is_mutation(kv_pb2.RequestOp(request_put=put()))


@pytest.mark.parametrize("req", [
    put(), put(value=b"v" * (1 << 20)), put(key=b"k" * 511),  # fine
    put(key=b""), put(key=b"k" * 512), put(value=b"v" * (1 << 20 | 1)),
    kv_pb2.PutRequest(key=b"k", lease=-5), put(value=b"v" * 200),
])
def test_put_request_check_is_size_then_put_check(req):
    """A unary Put's one-call check refuses exactly what the two checks refuse, with their message."""
    lim = Limits(max_request_bytes=(3 << 19) if len(req.value) != 200 else 100)

    def outcome(check):
        try:
            check()
        except InvalidRequest as e:
            return str(e)
        return None

    want = outcome(lambda: (lim.check_request_size(req), lim.check_put(req)))
    assert outcome(lambda: lim.check_put_request(req)) == want
