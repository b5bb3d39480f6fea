"""MVCC history: every revision of every key, kept until compacted (etcd's mvcc).

LMDB layout, three sub-databases written in the same transaction:

  kv       key -> record (create, mod, version header + value): the latest
           value only, as before MVCC. Latest reads, compares and the plain-put
           fast path touch this one db, so MVCC costs them nothing to read.
  history  (revision, sub) -> event, 12-byte big-endian keys, so the db is in
           revision order and every write appends at its end (MDB_APPEND: no
           page search, pages filled full). sub numbers the writes that share
           one revision (a txn, a delete of a range). A watch replays history
           from any revision with one cursor walk.
  key_revs key -> (revision, sub), a DUPSORT/DUPFIXED db: per key the sorted
           list of revisions at which it was written. A read at revision R
           finds each key's newest write <= R with one seek (set_range_dup),
           then reads that event from history.

Event encoding: kind (1 byte: PUT or DELETE) + key length (2 bytes) + key +
a stored record (keys.py: 24-byte header + value). A delete's record is the
header (0, revision, 0) and no value, as etcd's tombstone reports it.

Compaction to R (etcd semantics): reads below R are refused, and for each key
only its newest write <= R survives, unless that write is a delete, which goes
too. The physical removal walks history from its start in revision order and
runs in bounded steps (compact_step), a few thousand events per applied
batch, so a large history never stalls apply. Removing in revision order
keeps every read at a revision >= R right at every step in between: an event
is removed only when a newer write of its key <= R exists, and a tombstone
only after every older write of its key is gone. Events of a key's newest
write <= R stay, so each later compaction rewalks from the start; that costs
one step per live key.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

import lmdb

from .keys import HEADER_SIZE, RECORD_HEADER

PUT = 0
DELETE = 1

REV = struct.Struct(">QI")  # (revision, sub): a history key and a key_revs value
_KEY_LEN = struct.Struct(">H")
_PUT_PREFIX = bytes([PUT])
_DELETE_PREFIX = bytes([DELETE])

COMPACT_STEP_EVENTS = 2000  # events examined per compaction step (~1 ms)

COMPACTED = "required revision has been compacted"
FUTURE = "required revision is a future revision"


class RevisionError(Exception):
    """A read or compaction at a revision that is compacted or not yet reached (OUT_OF_RANGE)."""


class Event(NamedTuple):
    """One write of one key: kind PUT or DELETE, the key, its stored record after the write."""

    revision: int
    sub: int
    kind: int
    key: bytes
    record: bytes  # header + value (a delete: header (0, revision, 0), no value)


def encode_put(key: bytes, record: bytes) -> bytes:
    return _PUT_PREFIX + _KEY_LEN.pack(len(key)) + key + record


def encode_delete(key: bytes, revision: int) -> bytes:
    return _DELETE_PREFIX + _KEY_LEN.pack(len(key)) + key + RECORD_HEADER.pack(0, revision, 0)


def decode(hkey: bytes, raw: bytes) -> Event:
    rev, sub = REV.unpack(hkey)
    n = _KEY_LEN.unpack_from(raw, 1)[0]
    return Event(rev, sub, raw[0], raw[3:3 + n], raw[3 + n:])


def event_key(raw: bytes) -> bytes:
    n = _KEY_LEN.unpack_from(raw, 1)[0]
    return raw[3:3 + n]


def check_revision(revision: int, compact_revision: int, current: int) -> None:
    """Raise RevisionError unless a read at `revision` can be served."""
    if revision < compact_revision:
        raise RevisionError(f"{COMPACTED} (asked for {revision}, compacted to {compact_revision})")
    if revision > current:
        raise RevisionError(f"{FUTURE} (asked for {revision}, current is {current})")


def record_at(txn: lmdb.Transaction, hist: lmdb._Database, key_revs: lmdb._Database, key: bytes,
              revision: int) -> bytes | None:
    """The stored record of `key` as it was at `revision` (None: absent then)."""
    cur = txn.cursor(db=key_revs)
    return _record_at(txn, hist, cur, key, revision)


def _record_at(txn, hist, cur: lmdb.Cursor, key: bytes, revision: int) -> bytes | None:
    if not cur.set_key(key):
        return None
    if cur.set_range_dup(key, REV.pack(revision + 1, 0)):
        if not cur.prev_dup():
            return None
    else:
        cur.last_dup()
    raw = txn.get(cur.value(), db=hist)
    if raw is None or raw[0] == DELETE:
        return None
    n = _KEY_LEN.unpack_from(raw, 1)[0]
    return raw[3 + n:]


def prev_record(txn, hist, key_revs, key: bytes, revision: int, sub: int) -> bytes | None:
    """The record of `key` just before its write at (revision, sub) (a watch's prev_kv)."""
    cur = txn.cursor(db=key_revs)
    if not cur.set_key_dup(key, REV.pack(revision, sub)) or not cur.prev_dup():
        return None
    raw = txn.get(cur.value(), db=hist)
    if raw is None or raw[0] == DELETE:
        return None
    return raw[3 + _KEY_LEN.unpack_from(raw, 1)[0]:]


def records_at(txn, hist, key_revs, key: bytes, end: bytes | None, revision: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, record) of every key in [key, end) (end None: no bound) that existed at `revision`, in key order."""
    cur = txn.cursor(db=key_revs)
    if not cur.set_range(key):
        return
    while True:
        k = cur.key()
        if end is not None and k >= end:
            return
        walker = txn.cursor(db=key_revs)
        record = _record_at(txn, hist, walker, k, revision)
        if record is not None:
            yield k, record
        if not cur.next_nodup():
            return


def events_from(txn, hist, start: int, stop: int | None = None) -> Iterator[Event]:
    """Every event with revision >= start (and < stop, when given), in revision order."""
    cur = txn.cursor(db=hist)
    if not cur.set_range(REV.pack(start, 0)):
        return
    limit = None if stop is None else REV.pack(stop, 0)
    for hkey, raw in cur:
        if limit is not None and hkey >= limit:
            return
        yield decode(hkey, raw)


def value_of(record: bytes) -> bytes:
    return record[HEADER_SIZE:]


def compact_step(txn, hist, key_revs, compact_to: int, resume: bytes, budget: int) -> bytes | None:
    """Remove up to `budget` events' worth of history below compact_to, from history key `resume`.

    Returns where to resume, or None once everything below compact_to is done.
    """
    cur = txn.cursor(db=hist)
    idx = txn.cursor(db=key_revs)
    if not cur.set_range(resume):
        return None
    examined = 0
    while True:
        hkey = cur.key()
        rev = REV.unpack(hkey)[0]
        if rev >= compact_to:
            return None
        if examined >= budget:
            return hkey
        examined += 1
        raw = cur.value()
        key = event_key(raw)
        if not idx.set_key_dup(key, hkey):
            raise lmdb.CorruptedError(f"history event {REV.unpack(hkey)} of {key!r} is missing from key_revs")
        newer = idx.next_dup() and REV.unpack(idx.value())[0] <= compact_to
        if newer or raw[0] == DELETE:
            idx.set_key_dup(key, hkey)  # a failed next_dup leaves the cursor unpositioned
            if not idx.delete():
                raise lmdb.CorruptedError(f"cannot remove {REV.unpack(hkey)} of {key!r} from key_revs")
            if not cur.delete():  # the cursor now points at the next event
                return None
            if not cur.key():
                return None
            continue
        if not cur.next():
            return None
