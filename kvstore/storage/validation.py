"""Static checks of requests, shared by the server (before proposing) and apply.

The server should call `check_op` on each client op before proposing it, so a
bad op of a Batch gets its own INVALID_ARGUMENT while the others go on. The
state machine re-checks every command anyway: the log is the source of truth
and a command that slipped through must be rejected identically everywhere,
before any of it is applied (nothing is half-applied).

Txn rules follow etcd: within one branch no key may be put twice and no put
may fall inside a delete range of another op, because the ops share a single
revision and their order would otherwise be ambiguous. A nested txn's two
branches are alternatives, so they are checked separately.
"""
from __future__ import annotations

from kvstore.v1 import command_pb2, kv_pb2

from .errors import InvalidRequest
from .keys import MAX_KEY_BYTES, in_range

MAX_TXN_DEPTH = 8  # nesting levels of txn inside txn

_COMPARE_UNION = {
    kv_pb2.Compare.VERSION: "version",
    kv_pb2.Compare.CREATE: "create_revision",
    kv_pb2.Compare.MOD: "mod_revision",
    kv_pb2.Compare.VALUE: "value",
}
_COMPARE_RESULTS = frozenset(kv_pb2.Compare.CompareResult.values())


def check_request_id(rid: kv_pb2.RequestId) -> None:
    if rid.client_id and not rid.seq:
        raise InvalidRequest("request_id.seq must be >= 1 when client_id is set")


def check_command(cmd: command_pb2.Command) -> None:
    """Raise InvalidRequest naming the first problem of a command."""
    check_request_id(cmd.request_id)
    for i, op in enumerate(cmd.ops):
        if op.WhichOneof("request") == "request_put":
            # Fast path for the op nearly every command is made of: the same
            # rules as check_op, which is still what names a problem.
            p = op.request_put
            key = p.key
            if key and len(key) <= MAX_KEY_BYTES and p.lease >= 0:
                continue
        try:
            check_op(op)
        except InvalidRequest as e:
            raise InvalidRequest(f"op {i}: {e}") from None


def check_op(op: kv_pb2.RequestOp, depth: int = 0) -> None:
    """Raise InvalidRequest naming what is wrong with one op (recursively)."""
    kind = op.WhichOneof("request")
    if kind == "request_range":
        check_range(op.request_range)
    elif kind == "request_put":
        p = op.request_put
        _check_key(p.key, "key")
        if p.lease < 0:
            raise InvalidRequest("lease must be >= 0 (0: no lease)")
    elif kind == "request_delete_range":
        _check_key(op.request_delete_range.key, "key")
    elif kind == "request_txn":
        _check_txn(op.request_txn, depth + 1)
    else:
        raise InvalidRequest("empty RequestOp (no range, put, delete_range or txn)")


def check_range(r: kv_pb2.RangeRequest) -> None:
    """check_op for a bare RangeRequest (no wrapping RequestOp to build)."""
    _check_key(r.key, "key")
    if r.limit < 0:
        raise InvalidRequest("range limit must be >= 0")
    if r.revision < 0:
        raise InvalidRequest("range revision must be >= 0")


def _check_key(key: bytes, what: str) -> None:
    if not key:
        raise InvalidRequest(f"{what} is empty")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidRequest(f"{what} is {len(key)} bytes; the limit is {MAX_KEY_BYTES}")


def _check_txn(txn: kv_pb2.TxnRequest, depth: int) -> None:
    if depth > MAX_TXN_DEPTH:
        raise InvalidRequest(f"txn nested deeper than {MAX_TXN_DEPTH} levels")
    for i, c in enumerate(txn.compare):
        _check_key(c.key, f"compare {i} key")
        if c.result not in _COMPARE_RESULTS:
            raise InvalidRequest(f"compare {i}: unknown result {c.result}")
        want = _COMPARE_UNION.get(c.target)
        if want is None:
            raise InvalidRequest(f"compare {i}: unknown target {c.target}")
        given = c.WhichOneof("target_union")
        if given is not None and given != want:
            raise InvalidRequest(
                f"compare {i}: target {kv_pb2.Compare.CompareTarget.Name(c.target)} "
                f"but {given} given"
            )
    for name, branch in (("success", txn.success), ("failure", txn.failure)):
        for i, op in enumerate(branch):
            if op.WhichOneof("request") == "request_range" and op.request_range.revision:
                raise InvalidRequest(f"txn {name} op {i}: a range inside a txn reads the txn's own "
                                     "revision (revision must be 0)")
            try:
                check_op(op, depth)
            except InvalidRequest as e:
                raise InvalidRequest(f"txn {name} op {i}: {e}") from None
        _check_branch_conflicts(branch, name)


def _writes(op: kv_pb2.RequestOp) -> tuple[set[bytes], list[tuple[bytes, bytes]]]:
    """Keys an op may put and ranges it may delete (either branch of a txn)."""
    kind = op.WhichOneof("request")
    if kind == "request_put":
        return {op.request_put.key}, []
    if kind == "request_delete_range":
        d = op.request_delete_range
        return set(), [(d.key, d.range_end)]
    if kind == "request_txn":
        puts: set[bytes] = set()
        dels: list[tuple[bytes, bytes]] = []
        for sub in (*op.request_txn.success, *op.request_txn.failure):
            sub_puts, sub_dels = _writes(sub)
            puts |= sub_puts
            dels += sub_dels
        return puts, dels
    return set(), []


def _check_branch_conflicts(branch, name: str) -> None:
    writes = [_writes(op) for op in branch]
    for i, (puts_i, _) in enumerate(writes):
        for j, (puts_j, dels_j) in enumerate(writes):
            if i == j:
                continue
            if j > i:
                dup = puts_i & puts_j
                if dup:
                    raise InvalidRequest(f"txn {name}: duplicate key {min(dup)!r} put twice")
            for k in puts_i:
                for key, end in dels_j:
                    if in_range(k, key, end):
                        raise InvalidRequest(
                            f"txn {name}: key {k!r} is both put and deleted"
                        )
