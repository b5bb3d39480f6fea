"""How keys, key ranges and per-key records are laid out in LMDB.

The `kv` sub-database maps the user's key (bytes, as given) to a record:
a fixed 24-byte header (create_revision, mod_revision, version as big-endian
int64) followed by the value. Keeping the header fixed-size lets a keys-only or
count-only range and a compare skip decoding the value. The same record is
kept for every revision of a key in the history (see history.py).
"""
from __future__ import annotations

import struct

from kvstore.v1 import kv_pb2

# LMDB's compiled-in limit (mdb_env_get_maxkeysize); also rules out the empty key.
MAX_KEY_BYTES = 511

# range_end meaning "every key >= key" (etcd's convention).
ALL_KEYS_END = b"\0"

_HEADER = struct.Struct(">qqq")
HEADER_SIZE = _HEADER.size
RECORD_HEADER = _HEADER  # for hot paths that pack/unpack inline


def encode_record(create_revision: int, mod_revision: int, version: int, value: bytes) -> bytes:
    return _HEADER.pack(create_revision, mod_revision, version) + value


def decode_header(raw: bytes) -> tuple[int, int, int]:
    """(create_revision, mod_revision, version) of a stored record."""
    return _HEADER.unpack_from(raw)


def decode_value(raw: bytes) -> bytes:
    return raw[HEADER_SIZE:]


def to_key_value(key: bytes, raw: bytes, keys_only: bool = False) -> kv_pb2.KeyValue:
    create, mod, version = _HEADER.unpack_from(raw)
    kv = kv_pb2.KeyValue(key=key, create_revision=create, mod_revision=mod, version=version)
    if not keys_only:
        kv.value = raw[HEADER_SIZE:]
    return kv


def add_key_value(kvs, key: bytes, raw: bytes, keys_only: bool = False) -> None:
    """Append the KeyValue of a stored record to a repeated field, built in place."""
    create, mod, version = _HEADER.unpack_from(raw)
    if keys_only:
        kvs.add(key=key, create_revision=create, mod_revision=mod, version=version)
    else:
        kvs.add(key=key, create_revision=create, mod_revision=mod, version=version, value=raw[HEADER_SIZE:])


def range_end_bound(key: bytes, range_end: bytes) -> bytes | None:
    """The exclusive upper bound of a multi-key range, None for "no bound".

    Only meaningful when range_end is non-empty (empty means the single key).
    A range_end <= key selects nothing; callers see that as end <= start.
    """
    if range_end == ALL_KEYS_END:
        return None
    return range_end


def in_range(k: bytes, key: bytes, range_end: bytes) -> bool:
    """Whether k falls in the request's [key, range_end) interpretation."""
    if not range_end:
        return k == key
    if k < key:
        return False
    end = range_end_bound(key, range_end)
    return end is None or k < end
