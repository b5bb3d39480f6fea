"""Request validation: reject bad input before it reaches raft.

Everything here runs before a proposal, so a violation costs nothing: the
request is answered INVALID_ARGUMENT (naming the limit, its flag and the
offending value), nothing is applied, and the log never carries a command the
state machine would have to refuse on every replica.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvstore.v1 import kv_pb2

ALL_KEYS_FROM = b"\0"  # range_end meaning "every key >= key"


class InvalidRequest(Exception):
    """The request breaks a rule or a limit; its message says which and by how much."""


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = 511
    max_value_bytes: int = 1 << 20
    max_request_bytes: int = 3 << 19  # 1.5 MiB
    max_txn_ops: int = 128
    max_batch_ops: int = 1024

    @classmethod
    def from_config(cls, cfg) -> Limits:
        return cls(
            max_key_bytes=cfg.max_key_bytes,
            max_value_bytes=cfg.max_value_bytes,
            max_request_bytes=cfg.max_request_bytes,
            max_txn_ops=cfg.max_txn_ops,
            max_batch_ops=cfg.max_batch_ops,
        )

    # -- building blocks -------------------------------------------------

    def check_request_size(self, request) -> None:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise InvalidRequest(
                f"request is {size} bytes; the limit is {self.max_request_bytes} (--max-request-bytes)"
            )

    def check_key(self, key: bytes, what: str = "key") -> None:
        if not key:
            raise InvalidRequest(f"{what} must not be empty")
        if len(key) > self.max_key_bytes:
            raise InvalidRequest(
                f"{what} is {len(key)} bytes; the limit is {self.max_key_bytes} (--max-key-bytes)"
            )

    def check_range(self, key: bytes, range_end: bytes) -> None:
        self.check_key(key)
        if range_end and range_end != ALL_KEYS_FROM:
            if len(range_end) > self.max_key_bytes:
                raise InvalidRequest(
                    f"range_end is {len(range_end)} bytes; the limit is {self.max_key_bytes} (--max-key-bytes)"
                )
            if range_end < key:
                raise InvalidRequest(f"range_end {range_end!r} sorts before key {key!r}: an inverted range")

    # -- one per request type -------------------------------------------

    def check_range_request(self, r: kv_pb2.RangeRequest) -> None:
        self.check_range(r.key, r.range_end)
        if r.limit < 0:
            raise InvalidRequest(f"limit is {r.limit}; it must be >= 0")

    def check_put(self, r: kv_pb2.PutRequest) -> None:
        self.check_key(r.key)
        if len(r.value) > self.max_value_bytes:
            raise InvalidRequest(
                f"value is {len(r.value)} bytes; the limit is {self.max_value_bytes} (--max-value-bytes)"
            )
        if r.lease < 0:
            raise InvalidRequest(f"lease is {r.lease}; it must be >= 0 (0: no lease)")

    def check_put_request(self, r: kv_pb2.PutRequest) -> None:
        """check_request_size and check_put in one call: a unary Put's whole check."""
        self.check_request_size(r)
        key, value = r.key, r.value
        if not key or len(key) > self.max_key_bytes or len(value) > self.max_value_bytes or r.lease < 0:
            self.check_put(r)  # names the problem

    def check_delete(self, r: kv_pb2.DeleteRangeRequest) -> None:
        self.check_range(r.key, r.range_end)

    def check_txn(self, r: kv_pb2.TxnRequest) -> None:
        for what, n in (("compares", len(r.compare)), ("success ops", len(r.success)), ("failure ops", len(r.failure))):
            if n > self.max_txn_ops:
                raise InvalidRequest(f"txn has {n} {what}; the limit is {self.max_txn_ops} (--max-txn-ops)")
        for c in r.compare:
            self.check_key(c.key, "compare key")
            if c.WhichOneof("target_union") == "value" and len(c.value) > self.max_value_bytes:
                raise InvalidRequest(
                    f"compare value is {len(c.value)} bytes; the limit is {self.max_value_bytes} (--max-value-bytes)"
                )
        for op in list(r.success) + list(r.failure):
            self.check_op(op)

    def check_op(self, op: kv_pb2.RequestOp) -> None:
        kind = op.WhichOneof("request")
        if kind == "request_range":
            self.check_range_request(op.request_range)
        elif kind == "request_put":
            self.check_put(op.request_put)
        elif kind == "request_delete_range":
            self.check_delete(op.request_delete_range)
        elif kind == "request_txn":
            self.check_txn(op.request_txn)
        else:
            raise InvalidRequest("operation is empty: set one of range, put, delete_range or txn")

    def check_batch_size(self, r: kv_pb2.BatchRequest) -> None:
        if len(r.ops) > self.max_batch_ops:
            raise InvalidRequest(
                f"batch has {len(r.ops)} ops; the limit is {self.max_batch_ops} (--max-batch-ops)"
            )


def is_mutation(op: kv_pb2.RequestOp) -> bool:
    """A range is a read; everything else (put, delete, txn) goes through the log."""
    return op.WhichOneof("request") != "request_range"
