"""A small transaction builder: compare / then / else.

    from kvstore.client.txn import Txn, value, version, put, get

    txn = (Txn()
           .when(value("lock") == "free")
           .then(put("lock", "mine"), get("config"))
           .otherwise(get("lock")))
    result = client.txn(txn)         # result.succeeded tells which branch ran

Compares are written with Python operators on a target (``value``,
``version``, ``create_revision``, ``mod_revision``). Ops are ``put``, ``get``
(a key or a range), ``delete`` and nested ``Txn`` objects.
"""
from __future__ import annotations

from typing import Union
from collections.abc import Iterable

from kvstore.client.types import BytesLike, prefix_end, to_bytes
from kvstore.v1 import kv_pb2

__all__ = [
    "Txn",
    "value",
    "version",
    "create_revision",
    "mod_revision",
    "put",
    "get",
    "delete",
    "range_request",
    "delete_request",
]

_C = kv_pb2.Compare
_OPS = {"==": _C.EQUAL, "!=": _C.NOT_EQUAL, ">": _C.GREATER, "<": _C.LESS}


class _Target:
    """A compare target on one key; the comparison operators build a ``Compare``."""

    __slots__ = ("key", "target", "field")

    def __init__(self, key: BytesLike, target: int, field: str) -> None:
        self.key = to_bytes(key)
        self.target = target
        self.field = field

    def _cmp(self, op: str, other: object) -> kv_pb2.Compare:
        c = kv_pb2.Compare(result=_OPS[op], target=self.target, key=self.key)  # type: ignore[arg-type]
        if self.field == "value":
            c.value = to_bytes(other)  # type: ignore[arg-type]
        else:
            if not isinstance(other, int):
                raise TypeError(f"{self.field} compares against an int, got {type(other).__name__}")
            setattr(c, self.field, other)
        return c

    def __eq__(self, other: object) -> kv_pb2.Compare:  # type: ignore[override]
        return self._cmp("==", other)

    def __ne__(self, other: object) -> kv_pb2.Compare:  # type: ignore[override]
        return self._cmp("!=", other)

    def __gt__(self, other: object) -> kv_pb2.Compare:
        return self._cmp(">", other)

    def __lt__(self, other: object) -> kv_pb2.Compare:
        return self._cmp("<", other)

    __hash__ = None  # type: ignore[assignment]


def value(key: BytesLike) -> _Target:
    """Compare a key's value (false for a missing key)."""
    return _Target(key, _C.VALUE, "value")


def version(key: BytesLike) -> _Target:
    """Compare a key's version (0 when missing: ``version(k) == 0`` means "absent")."""
    return _Target(key, _C.VERSION, "version")


def create_revision(key: BytesLike) -> _Target:
    return _Target(key, _C.CREATE, "create_revision")


def mod_revision(key: BytesLike) -> _Target:
    return _Target(key, _C.MOD, "mod_revision")


# --- ops -------------------------------------------------------------------


def range_request(
    key: BytesLike,
    end: BytesLike | None = None,
    *,
    prefix: bool = False,
    limit: int = 0,
    keys_only: bool = False,
    count_only: bool = False,
    serializable: bool = False,
    revision: int = 0,
) -> kv_pb2.RangeRequest:
    k = to_bytes(key)
    if prefix:
        if end is not None:
            raise ValueError("give either prefix=True or an end, not both")
        range_end = prefix_end(k)
    else:
        range_end = to_bytes(end) if end is not None else b""
    return kv_pb2.RangeRequest(
        key=k,
        range_end=range_end,
        limit=limit,
        keys_only=keys_only,
        count_only=count_only,
        serializable=serializable,
        revision=revision,
    )


def delete_request(
    key: BytesLike, end: BytesLike | None = None, *, prefix: bool = False, prev_kv: bool = False
) -> kv_pb2.DeleteRangeRequest:
    k = to_bytes(key)
    if prefix:
        if end is not None:
            raise ValueError("give either prefix=True or an end, not both")
        range_end = prefix_end(k)
    else:
        range_end = to_bytes(end) if end is not None else b""
    return kv_pb2.DeleteRangeRequest(key=k, range_end=range_end, prev_kv=prev_kv)


def put(key: BytesLike, val: BytesLike, *, prev_kv: bool = False, lease: int = 0) -> kv_pb2.RequestOp:
    """A put inside a txn; ``lease``: attach the key to that lease."""
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=to_bytes(key), value=to_bytes(val), prev_kv=prev_kv,
                                                          lease=lease))


def get(
    key: BytesLike,
    end: BytesLike | None = None,
    *,
    prefix: bool = False,
    limit: int = 0,
    keys_only: bool = False,
    count_only: bool = False,
) -> kv_pb2.RequestOp:
    """A read inside a txn (it sees the txn's snapshot; always consistent with it)."""
    return kv_pb2.RequestOp(
        request_range=range_request(
            key, end, prefix=prefix, limit=limit, keys_only=keys_only, count_only=count_only
        )
    )


def delete(
    key: BytesLike, end: BytesLike | None = None, *, prefix: bool = False, prev_kv: bool = False
) -> kv_pb2.RequestOp:
    return kv_pb2.RequestOp(request_delete_range=delete_request(key, end, prefix=prefix, prev_kv=prev_kv))


Op = Union[kv_pb2.RequestOp, "Txn"]


def _op(o: Op) -> kv_pb2.RequestOp:
    if isinstance(o, Txn):
        return kv_pb2.RequestOp(request_txn=o.to_pb())
    if isinstance(o, kv_pb2.RequestOp):
        return o
    raise TypeError(f"not a txn op: {o!r} (use put/get/delete/Txn)")


class Txn:
    """If every compare holds, ``success`` runs, else ``failure``; atomically."""

    __slots__ = ("compare", "success", "failure")

    def __init__(
        self,
        compare: Iterable[kv_pb2.Compare] = (),
        success: Iterable[Op] = (),
        failure: Iterable[Op] = (),
    ) -> None:
        self.compare: list[kv_pb2.Compare] = list(compare)
        self.success: list[kv_pb2.RequestOp] = [_op(o) for o in success]
        self.failure: list[kv_pb2.RequestOp] = [_op(o) for o in failure]
        for c in self.compare:
            if not isinstance(c, kv_pb2.Compare):
                raise TypeError(f"not a compare: {c!r} (write e.g. value('k') == 'v')")

    def when(self, *compares: kv_pb2.Compare) -> Txn:
        for c in compares:
            if not isinstance(c, kv_pb2.Compare):
                raise TypeError(f"not a compare: {c!r} (write e.g. value('k') == 'v')")
        self.compare.extend(compares)
        return self

    def then(self, *ops: Op) -> Txn:
        self.success.extend(_op(o) for o in ops)
        return self

    def otherwise(self, *ops: Op) -> Txn:
        self.failure.extend(_op(o) for o in ops)
        return self

    def to_pb(self) -> kv_pb2.TxnRequest:
        return kv_pb2.TxnRequest(compare=self.compare, success=self.success, failure=self.failure)
