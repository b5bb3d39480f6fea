"""Plain results handed to users (not protobuf messages).

Each carries the cluster ``revision`` the answer reflects. Most are frozen
slotted dataclasses built straight from the response messages; the two on
the hot path (PutResult, GetResult) keep their message and convert it on first
use (see ``_FromResponse``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any, Self, Union

from kvstore.v1 import kv_pb2

__all__ = [
    "KeyValue",
    "PutResult",
    "GetResult",
    "RangeResult",
    "DeleteResult",
    "TxnResult",
    "OpResult",
    "Member",
    "MemberStatus",
    "to_bytes",
    "prefix_end",
]

BytesLike = bytes | str


def to_bytes(x: BytesLike) -> bytes:
    """Keys and values accept bytes or str (encoded as UTF-8)."""
    if type(x) is bytes:
        return x
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    raise TypeError(f"expected bytes or str, got {type(x).__name__}")


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix``.

    Increment the last byte that is not 0xff and drop what follows; a prefix of
    only 0xff bytes (or empty) has no upper bound, spelled "\\0" in the API.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> KeyValue:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


_new = object.__new__
_setattr = object.__setattr__
_BatchResult = kv_pb2.BatchResult


def _response(r: Any, field: str) -> Any:
    """A unary reply as is; a coalesced op's BatchResult slot opened to its ``field`` response."""
    return getattr(r.response, field) if type(r) is _BatchResult else r


class _FromResponse:
    """Base of the hot-path results (put, get): read from their response message on first use.

    Converting every answer eagerly (a frozen dataclass per result and per
    KeyValue, ~1.5 µs for a put and ~4 µs for a get) cost the closed-loop
    bench more client CPU than the coalescer itself, and most callers never
    look at the fields. ``from_pb`` only keeps the message (the response, or
    the BatchResult slot holding it); the first field read converts
    everything and drops it. Like the frozen dataclasses they
    replace: immutable, equal and hashed by field values, same repr; the
    constructor takes the same fields.
    """

    __slots__ = ("_pb", "_revision")
    _pb: Any  # the response message until the first field read, then None
    _revision: int
    _fields: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, r: object) -> Self:
        """Keep the response (or BatchResult slot); fields are read from it on first use."""
        o = _new(cls)
        _set_pb(o, r)
        return o

    def _load(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def revision(self) -> int:
        if self._pb is not None:
            self._load()
        return self._revision

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (type(self), self._values())


_set_pb = _FromResponse.__dict__["_pb"].__set__


class PutResult(_FromResponse):
    """``revision`` of the write; ``prev_kv`` what it replaced (asked for with ``prev_kv=True``)."""

    __slots__ = ("_prev_kv",)
    _prev_kv: KeyValue | None
    _fields = ("revision", "prev_kv")

    def __init__(self, revision: int, prev_kv: KeyValue | None = None) -> None:
        _setattr(self, "_pb", None)
        _setattr(self, "_revision", revision)
        _setattr(self, "_prev_kv", prev_kv)

    def _load(self) -> None:
        r = _response(self._pb, "response_put")
        _setattr(self, "_revision", r.header.revision)
        _setattr(self, "_prev_kv", KeyValue.from_pb(r.prev_kv) if r.HasField("prev_kv") else None)
        _setattr(self, "_pb", None)

    @property
    def prev_kv(self) -> KeyValue | None:
        if self._pb is not None:
            self._load()
        return self._prev_kv


class GetResult(_FromResponse):
    """One key: ``kv`` is None when the key does not exist."""

    __slots__ = ("_kv",)
    _kv: KeyValue | None
    _fields = ("revision", "kv")

    def __init__(self, revision: int, kv: KeyValue | None) -> None:
        _setattr(self, "_pb", None)
        _setattr(self, "_revision", revision)
        _setattr(self, "_kv", kv)

    def _load(self) -> None:
        r = _response(self._pb, "response_range")
        _setattr(self, "_revision", r.header.revision)
        _setattr(self, "_kv", KeyValue.from_pb(r.kvs[0]) if r.kvs else None)
        _setattr(self, "_pb", None)

    @property
    def kv(self) -> KeyValue | None:
        if self._pb is not None:
            self._load()
        return self._kv

    @property
    def value(self) -> bytes | None:
        kv = self.kv
        return kv.value if kv is not None else None

    @property
    def found(self) -> bool:
        return self.kv is not None

    def __bool__(self) -> bool:
        return self.kv is not None


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int
    kvs: list[KeyValue] = field(default_factory=list)
    more: bool = False
    count: int = 0

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.kvs)

    def __len__(self) -> int:
        return len(self.kvs)

    @classmethod
    def from_pb(cls, r: kv_pb2.RangeResponse) -> RangeResult:
        kv = KeyValue
        return cls(
            r.header.revision,
            [kv(x.key, x.value, x.create_revision, x.mod_revision, x.version, x.lease) for x in r.kvs],
            r.more,
            r.count,
        )


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: int
    prev_kvs: list[KeyValue] = field(default_factory=list)

    @classmethod
    def from_pb(cls, r: kv_pb2.DeleteRangeResponse) -> DeleteResult:
        return cls(r.header.revision, r.deleted, [KeyValue.from_pb(x) for x in r.prev_kvs])


OpResult = Union[PutResult, RangeResult, DeleteResult, "TxnResult"]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded`` says which branch ran; ``responses`` holds one result per op of it."""

    revision: int
    succeeded: bool
    responses: list[OpResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.succeeded

    @classmethod
    def from_pb(cls, r: kv_pb2.TxnResponse) -> TxnResult:
        return cls(r.header.revision, r.succeeded, [op_result(x) for x in r.responses])


def op_result(op: kv_pb2.ResponseOp) -> OpResult:
    """The typed result of one ResponseOp (ranges inside txns come back as RangeResult)."""
    which = op.WhichOneof("response")
    if which == "response_put":
        return PutResult.from_pb(op.response_put)
    if which == "response_range":
        return RangeResult.from_pb(op.response_range)
    if which == "response_delete_range":
        return DeleteResult.from_pb(op.response_delete_range)
    if which == "response_txn":
        return TxnResult.from_pb(op.response_txn)
    raise ValueError(f"empty ResponseOp: {op!r}")


@dataclass(frozen=True, slots=True)
class Member:
    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str]
    is_learner: bool = False


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member's view of itself and the cluster (from the Status RPC)."""

    endpoint: str
    member_id: int
    role: str
    term: int
    leader_id: int
    commit_index: int
    applied_index: int
    wal_size: int
    db_size: int
    snapshot_index: int
    version: str
    revision: int
    errors: tuple[str, ...] = ()  # active alarms, as etcd shows them: "memberID:3 alarm:CORRUPT"

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"
