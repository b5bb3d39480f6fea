"""How keys, key ranges and per-key records are laid out in LMDB.

A stored record is a fixed 28-byte header (create_revision and mod_revision
as big-endian int64, sub as uint32, version as int64) followed by the value.
Keeping the header fixed-size lets a keys-only or count-only range and a
compare skip decoding the value. (mod_revision, sub) number the write that
made the record, and its 12 bytes at WRITE_KEY are that write's history key,
packed as history.REV packs it (sub numbers the writes that share a revision:
0 but in a txn or a range delete). The `latest` sub-database maps the user's
key (bytes, as given) to the header alone; the whole record is in the
write's history event (see history.py).
"""
from __future__ import annotations

import struct

from kvstore.v1 import kv_pb2

# LMDB's compiled-in limit (mdb_env_get_maxkeysize); also rules out the empty key.
MAX_KEY_BYTES = 511

# range_end meaning "every key >= key" (etcd's convention).
ALL_KEYS_END = b"\0"

_HEADER = struct.Struct(">qqIq")  # create_revision, mod_revision, sub, version
HEADER_SIZE = _HEADER.size
RECORD_HEADER = _HEADER  # for hot paths that pack/unpack inline
WRITE_KEY = slice(8, 20)  # record[WRITE_KEY]: (mod_revision, sub) as a history key


def encode_header(create_revision: int, mod_revision: int, version: int, sub: int = 0) -> bytes:
    return _HEADER.pack(create_revision, mod_revision, sub, version)


def decode_header(raw: bytes) -> tuple[int, int, int]:
    """(create_revision, mod_revision, version) of a stored record."""
    create, mod, _, version = _HEADER.unpack_from(raw)
    return create, mod, version


def decode_value(raw: bytes) -> bytes:
    return raw[HEADER_SIZE:]


def to_key_value(key: bytes, raw: bytes, keys_only: bool = False) -> kv_pb2.KeyValue:
    create, mod, _, version = _HEADER.unpack_from(raw)
    kv = kv_pb2.KeyValue(key=key, create_revision=create, mod_revision=mod, version=version)
    if not keys_only:
        kv.value = raw[HEADER_SIZE:]
    return kv


def add_key_value(kvs, key: bytes, raw: bytes, keys_only: bool = False) -> None:
    """Append the KeyValue of a stored record to a repeated field, built in place."""
    create, mod, _, version = _HEADER.unpack_from(raw)
    if keys_only:
        kvs.add(key=key, create_revision=create, mod_revision=mod, version=version)
    else:
        kvs.add(key=key, create_revision=create, mod_revision=mod, version=version, value=raw[HEADER_SIZE:])


def add_header_value(kvs, key: bytes, header: bytes, value: bytes) -> None:
    """Append the KeyValue of a key's header and value to a repeated field, built in place."""
    create, mod, _, version = _HEADER.unpack_from(header)
    kvs.add(key=key, create_revision=create, mod_revision=mod, version=version, value=value)


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
