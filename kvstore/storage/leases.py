"""Leases in the state machine: which leases exist, their TTLs, and the keys each holds.

Three LMDB sub-databases, written inside the apply transaction (so a lease,
its keys and the key records always agree):

  leases      lease id (8 bytes, big-endian) -> granted TTL in seconds (8 bytes)
  lease_keys  lease id + key -> b""   the keys of a lease, in key order
  key_leases  key -> lease id         the lease of a key (put, delete, KeyValue.lease)

Expiry is not decided here: time is not part of the replicated state. The
leader's lessor (kvstore/server/lessor.py) decides that a lease expired and
proposes a revoke entry; applying it deletes the lease's keys through the
state machine's ordinary delete path, all at one revision.

Attaching follows etcd: a put with lease L attaches the key to L (detaching it
from any other lease); a put without a lease detaches it; a delete detaches it.
A command whose puts name a lease that does not exist is refused as a whole
(NOT_FOUND "lease not found"), nested txn branches included.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import lmdb

from kvstore.v1 import kv_pb2

from .errors import ErrorCode, InvalidRequest

DB_NAMES = (b"leases", b"lease_keys", b"key_leases")
MAX_LEASE_TTL = 9_000_000_000  # seconds, etcd's MaxLeaseTTL
LEASE_NOT_FOUND = "lease not found"
LEASE_EXISTS = "lease already exists"

_ID = struct.Struct(">q")


class LeaseNotFound(InvalidRequest):
    """A put names a lease that does not exist (or a revoke does)."""

    code = ErrorCode.NOT_FOUND

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"{LEASE_NOT_FOUND} (lease {lease_id})")
        self.lease_id = lease_id


def missing_lease(op: kv_pb2.RequestOp, leases: dict[int, int]) -> int:
    """The first lease a put in op names that is not in `leases` (a StateMachine.leases), else 0."""
    kind = op.WhichOneof("request")
    if kind == "request_put":
        lease = op.request_put.lease
        return lease if lease and lease not in leases else 0
    if kind == "request_txn":
        for o in (*op.request_txn.success, *op.request_txn.failure):
            missing = missing_lease(o, leases)
            if missing:
                return missing
    return 0


class LeaseStore:
    """The three lease sub-databases; every method works inside the caller's transaction."""

    def __init__(self, leases_db: lmdb._Database, lease_keys_db: lmdb._Database, key_leases_db: lmdb._Database):
        self._leases = leases_db
        self._lease_keys = lease_keys_db
        self._key_leases = key_leases_db

    # ---- leases

    def load(self, txn: lmdb.Transaction[bytes]) -> dict[int, int]:
        """Every lease: id -> granted TTL (seconds)."""
        return {_ID.unpack(k)[0]: _ID.unpack(v)[0] for k, v in txn.cursor(db=self._leases)}

    def exists(self, txn: lmdb.Transaction[bytes], lease_id: int) -> bool:
        return txn.get(_ID.pack(lease_id), db=self._leases) is not None

    def grant(self, txn: lmdb.Transaction[bytes], lease_id: int, ttl: int) -> bool:
        """Create the lease; False if one with that id exists already."""
        return txn.put(_ID.pack(lease_id), _ID.pack(ttl), overwrite=False, db=self._leases)

    def keys_of(self, txn: lmdb.Transaction[bytes], lease_id: int) -> list[bytes]:
        """The keys attached to the lease, in key order."""
        prefix = _ID.pack(lease_id)
        cur = txn.cursor(db=self._lease_keys)
        out: list[bytes] = []
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(prefix):
                    break
                out.append(k[len(prefix):])
        return out

    def drop(self, txn: lmdb.Transaction[bytes], lease_id: int) -> None:
        """Remove the lease record (its keys must have been deleted, which detached them)."""
        txn.delete(_ID.pack(lease_id), db=self._leases)

    # ---- keys

    def any_attached(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Whether any key has a lease (if not, puts and deletes need no lease bookkeeping)."""
        return txn.stat(self._key_leases)["entries"] > 0

    def has_lease_lookup(self, txn: lmdb.Transaction[bytes]) -> Callable[[bytes], bool]:
        """A fast `key -> whether it has a lease` for one transaction (a cursor: no keyword calls)."""
        return txn.cursor(db=self._key_leases).set_key

    def lease_of(self, txn: lmdb.Transaction[bytes], key: bytes) -> int:
        raw = txn.get(key, db=self._key_leases)
        return 0 if raw is None else _ID.unpack(raw)[0]

    def attach(self, txn: lmdb.Transaction[bytes], key: bytes, lease_id: int) -> None:
        """Make lease_id the key's lease (0: none), detaching it from any other."""
        old = txn.get(key, db=self._key_leases)
        if old is not None:
            if lease_id and _ID.unpack(old)[0] == lease_id:
                return
            txn.delete(old + key, db=self._lease_keys)
            if not lease_id:
                txn.delete(key, db=self._key_leases)
                return
        if lease_id:
            packed = _ID.pack(lease_id)
            txn.put(key, packed, db=self._key_leases)
            txn.put(packed + key, b"", db=self._lease_keys)

    def detach(self, txn: lmdb.Transaction[bytes], key: bytes) -> None:
        self.attach(txn, key, 0)

    def check_puts(self, txn: lmdb.Transaction[bytes], ops: Iterable[kv_pb2.RequestOp]) -> None:
        """Raise LeaseNotFound if a put among ops (either branch of a txn too) names a missing lease."""
        for op in ops:
            kind = op.WhichOneof("request")
            if kind == "request_put":
                lease = op.request_put.lease
                if lease and not self.exists(txn, lease):
                    raise LeaseNotFound(lease)
            elif kind == "request_txn":
                self.check_puts(txn, op.request_txn.success)
                self.check_puts(txn, op.request_txn.failure)

    def fill(self, txn: lmdb.Transaction[bytes], kvs: Iterable[kv_pb2.KeyValue]) -> None:
        """Set KeyValue.lease of each kv from the key's lease."""
        get, db = txn.get, self._key_leases
        for kv in kvs:
            raw = get(kv.key, db=db)
            if raw is not None:
                kv.lease = _ID.unpack(raw)[0]
