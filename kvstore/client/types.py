"""Plain results handed to users (not protobuf messages).

Each carries the cluster ``revision`` the answer reflects. They are slotted
dataclasses built straight from the response messages, so the conversion costs
a few attribute reads per key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

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

BytesLike = Union[bytes, str]


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
    def from_pb(cls, kv: kv_pb2.KeyValue) -> "KeyValue":
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None = None

    @classmethod
    def from_pb(cls, r: kv_pb2.PutResponse) -> "PutResult":
        return cls(r.header.revision, KeyValue.from_pb(r.prev_kv) if r.HasField("prev_kv") else None)


@dataclass(frozen=True, slots=True)
class GetResult:
    """One key: ``kv`` is None when the key does not exist."""

    revision: int
    kv: KeyValue | None

    @property
    def value(self) -> bytes | None:
        return self.kv.value if self.kv is not None else None

    @property
    def found(self) -> bool:
        return self.kv is not None

    def __bool__(self) -> bool:
        return self.kv is not None

    @classmethod
    def from_pb(cls, r: kv_pb2.RangeResponse) -> "GetResult":
        return cls(r.header.revision, KeyValue.from_pb(r.kvs[0]) if r.kvs else None)


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int
    kvs: list[KeyValue] = field(default_factory=list)
    more: bool = False
    count: int = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.kvs)

    def __len__(self) -> int:
        return len(self.kvs)

    @classmethod
    def from_pb(cls, r: kv_pb2.RangeResponse) -> "RangeResult":
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
    def from_pb(cls, r: kv_pb2.DeleteRangeResponse) -> "DeleteResult":
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
    def from_pb(cls, r: kv_pb2.TxnResponse) -> "TxnResult":
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

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"
