"""A hash of the key/value state, comparable across members (like etcd's HashKV).

Replicas that silently diverge (a bit flip, a bug in one member's apply, a
disk that returned the wrong page) are the worst failure a replicated store
can have: every member still answers, with different data. Members detect it
by comparing a hash of their whole key/value state at the same point of the
log. The point is a hash barrier: an internal command that every member
applies at the same index, and hashes at exactly that index, inside the apply
transaction (see StateMachine.apply).

The hash is CRC-32 (etcd uses CRC-32C) over each key and its stored record
(create and mod revision, version, value), in key order, and then over the
MVCC history from the compacted revision on (history.py), with lengths so that
no two different states run together into the same bytes. Hashing reads the
whole store: about 0.3 us per key, once per check.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .history import record_of

_LENGTHS = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class HashMark:
    """A member's hash of its key/value state when it applied the barrier at `index`."""

    index: int
    revision: int
    hash: int


def hash_kv(txn, history_db=None, history_from: bytes = b"") -> int:
    """CRC-32 of every (key, record) of `txn`'s default database (the latest one), in key
    order, then of every history event from key `history_from` on, in revision order.

    A record is the key's header with its value, read from the history event the header
    names (see history.py): a value that differs, however old, changes the hash.

    The history part starts at the compacted revision: what lies below it is
    removed in steps whose progress may differ between members, and no read
    can see it.
    """
    h = 0
    crc = zlib.crc32
    pack = _LENGTHS.pack
    for key, header in txn.cursor():
        record = header if history_db is None else record_of(txn, history_db, header)
        h = crc(record, crc(key, crc(pack(len(key), len(record)), h)))
    if history_db is not None:
        cur = txn.cursor(db=history_db)
        if cur.set_range(history_from):
            for key, event in cur:
                h = crc(event, crc(key, crc(pack(len(key), len(event)), h)))
    return h
