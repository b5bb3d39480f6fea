"""MVCC history: every revision of every key, kept until compacted (etcd's mvcc).

LMDB layout, three sub-databases written in the same transaction:

  latest     key -> the 28-byte header (keys.py: create, mod, sub, version)
             of the key's newest write, and no value: an index into history.
             Latest reads, compares and the plain-put fast path find a key's
             revisions here; a value is one more lookup, in history. (mod,
             sub) is the history key of the write that made the header: the
             head of the key's chain (below), and where its value is.
  history    (revision, sub) -> event, 12-byte big-endian keys, so the db is in
             revision order and every write appends at its end (MDB_APPEND: no
             page search, pages filled full). sub numbers the writes that share
             one revision (a txn, a delete of a range). A watch replays history
             from any revision with one cursor walk.
  tombstones key -> (revision, sub) of its last delete: the chain head of a
             key that is deleted now. Written by deletes only; a put that
             re-creates the key leaves it (latest is then the head), and
             compaction removes it with that delete's event.

Each value is stored once, in its put's event. When `latest` held the value
too, the file held every live value twice: a long write load of big values
filled the page cache at half the data (the soak, issue 19), and every put
wrote its value twice. A key's newest put is never compacted (nothing names
it as prev and it is no delete, see below), so the header's event is always
there.

Chains, not an index. Each event names the history key of the previous write
of its key (`prev`, zeros for a key's first write), so a key's writes form a
chain from its head, newest first. A read at revision R takes the key's newest
put when its mod revision is <= R (one history read); otherwise it follows
the chain from the head to the newest write <= R: a put is the answer, a
delete or the chain's end means the key was absent. A key -> revisions index
(DUPSORT) cost an insert per put into a random page, about a third of the
apply path's instructions and as many pages written as the key db itself; a chain
link costs 12 bytes in an event that is appended anyway.

Event encoding: prev (12 bytes) + kind (1 byte: PUT or DELETE, with the
LEASED bit when the put attached a lease) + key length (2 bytes) + key + the
lease id (8 bytes, only with LEASED) + a stored record (keys.py). A delete's
record is the header (0, revision, sub, 0) and no value, as etcd's tombstone
reports it. (kind and key length are one precomputed prefix per key length
on the put path.)

Compaction to C (etcd semantics): reads below C are refused, and for each key
only its newest write <= C survives, unless that write is a delete, which goes
too. So an event below C goes when the next write of its key is <= C (the
write whose prev names it), or when it is a delete. The removal walks history
in revision order over the events up to C; visiting an event removes its prev
(older than the event, as a txn writes a key at most once) and the event
itself when it is a delete below C, with its tombstone. It runs in bounded
steps (compact_step), a few thousand events per applied batch, so a large
history never stalls apply. Every read at a revision R >= C stays right at
every step in between: a chain walk stops at the newest write <= R, and
nothing at or above it is removed (a removed event lies below the next write
of its key, which is <= C <= R), so a missing link can only be a removed
delete or lie beyond a read's answer: the key was absent. A walk that ends at
C has dealt with every event below C for good; the next compaction walks on
from C (a delete at C, kept by the last walk, goes now), so each event is
visited about once over all compactions.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

import lmdb

from .keys import HEADER_SIZE, MAX_KEY_BYTES, RECORD_HEADER, WRITE_KEY

PUT = 0
DELETE = 1
LEASED = 0x80  # a flag on a PUT's kind byte: the lease id follows the key

REV = struct.Struct(">QI")  # (revision, sub): a history key
NO_PREV = bytes(REV.size)  # prev of a key's first write (a revision is never 0)
_KEY_LEN = struct.Struct(">H")
_LEASE = struct.Struct(">q")
_MOD = struct.Struct(">q")  # a record's mod revision, at offset 8 (keys.py)
_PREV_END = REV.size  # prev is event[:_PREV_END], the kind byte event[_PREV_END]
_KEY_AT = _PREV_END + 1 + _KEY_LEN.size
_VALUE_AT = _KEY_AT + HEADER_SIZE  # plus the key length (and the lease id, if LEASED)
# kind + key length of a put, by key length: what a put's event holds between prev and key
PUT_HEADS = tuple(bytes([PUT]) + _KEY_LEN.pack(n) for n in range(MAX_KEY_BYTES + 1))

COMPACT_STEP_EVENTS = 2000  # events visited per compaction step (~1 ms)

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
    record: bytes  # header + value (a delete: header (0, revision, sub, 0), no value)
    lease: int  # the lease the put attached the key to (0: none; always 0 for a delete)
    prev: bytes  # history key of the key's previous write (NO_PREV: none)


def encode_put(key: bytes, header: bytes, value: bytes, prev: bytes, lease: int = 0) -> bytes:
    """A put's event (the inline put path builds the same bytes from PUT_HEADS)."""
    if lease:
        return b"".join((prev, bytes([PUT | LEASED]), _KEY_LEN.pack(len(key)), key, _LEASE.pack(lease), header,
                         value))
    return b"".join((prev, PUT_HEADS[len(key)], key, header, value))


def encode_delete(key: bytes, revision: int, sub: int, prev: bytes) -> bytes:
    return b"".join((prev, bytes([DELETE]), _KEY_LEN.pack(len(key)), key, RECORD_HEADER.pack(0, revision, sub, 0)))


def _is_delete(raw: bytes) -> bool:
    return raw[_PREV_END] == DELETE


def decode(hkey: bytes, raw: bytes) -> Event:
    rev, sub = REV.unpack(hkey)
    kind = raw[_PREV_END]
    end = _KEY_AT + _KEY_LEN.unpack_from(raw, _PREV_END + 1)[0]
    lease = 0
    at = end
    if kind & LEASED:
        lease = _LEASE.unpack_from(raw, end)[0]
        at += _LEASE.size
    return Event(rev, sub, kind & ~LEASED, raw[_KEY_AT:end], raw[at:], lease, raw[:_PREV_END])


def record_in(raw: bytes) -> bytes:
    """The stored record (header + value) inside a put's event."""
    at = _KEY_AT + _KEY_LEN.unpack_from(raw, _PREV_END + 1)[0]
    return raw[at + _LEASE.size:] if raw[_PREV_END] & LEASED else raw[at:]


def record_of(txn: lmdb.Transaction[bytes], hist: lmdb._Database, header: bytes) -> bytes:
    """The stored record (header + value) of the put whose `latest` header is `header`."""
    return record_in(_event_of(txn, hist, header))


def value_of(txn: lmdb.Transaction[bytes], hist: lmdb._Database, header: bytes) -> bytes:
    """The value of the put whose `latest` header is `header` (a latest read's path)."""
    raw = txn.get(header[WRITE_KEY], None, hist)  # positional: py-lmdb parses keywords slowly
    if raw is None:
        raw = _event_of(txn, hist, header)  # raises
    at = _VALUE_AT + _KEY_LEN.unpack_from(raw, _PREV_END + 1)[0]
    return raw[at + _LEASE.size:] if raw[_PREV_END] & LEASED else raw[at:]


def _event_of(txn: lmdb.Transaction[bytes], hist: lmdb._Database, header: bytes) -> bytes:
    raw = txn.get(header[WRITE_KEY], db=hist)
    if raw is None:  # a key's newest put is never compacted
        raise lmdb.CorruptedError(f"history event {REV.unpack(header[WRITE_KEY])} of a live key is missing")
    return raw


def check_revision(revision: int, compact_revision: int, current: int) -> None:
    """Raise RevisionError unless a read at `revision` can be served."""
    if revision < compact_revision:
        raise RevisionError(f"{COMPACTED} (asked for {revision}, compacted to {compact_revision})")
    if revision > current:
        raise RevisionError(f"{FUTURE} (asked for {revision}, current is {current})")


class Version(NamedTuple):
    """A key as it was at some revision: its stored record and lease (None: the key's lease now)."""

    record: bytes
    lease: int | None


def version_at(txn: lmdb.Transaction[bytes], latest: lmdb._Database, hist: lmdb._Database, tombs: lmdb._Database,
               key: bytes, revision: int) -> Version | None:
    """`key` as it was at `revision` (None: absent then); revision must not be compacted."""
    raw = txn.get(key, db=latest)
    if raw is None:
        head = txn.get(key, db=tombs)
        return None if head is None else _walk(txn, hist, key, head, REV.pack(revision + 1, 0))
    if _MOD.unpack_from(raw, 8)[0] <= revision:
        return Version(record_of(txn, hist, raw), None)
    return _walk(txn, hist, key, raw[WRITE_KEY], REV.pack(revision + 1, 0))


def _walk(txn: lmdb.Transaction[bytes], hist: lmdb._Database, key: bytes, hkey: bytes, limit: bytes) -> Version | None:
    """Follow key's chain from history key `hkey` to its newest write below `limit`."""
    while hkey >= limit:
        raw = txn.get(hkey, db=hist)
        if raw is None:  # nothing at or above a readable revision is ever removed
            raise lmdb.CorruptedError(f"history event {REV.unpack(hkey)} of {key!r} is missing")
        hkey = raw[:_PREV_END]
    if hkey == NO_PREV:
        return None
    raw = txn.get(hkey, db=hist)
    if raw is None or _is_delete(raw):  # absent: deleted (a removed delete, below the compacted revision)
        return None
    ev = decode(hkey, raw)
    return Version(ev.record, ev.lease)


def versions_at(txn: lmdb.Transaction[bytes], latest: lmdb._Database, hist: lmdb._Database, tombs: lmdb._Database,
                key: bytes, end: bytes | None, revision: int) -> Iterator[tuple[bytes, Version]]:
    """(key, Version) of every key in [key, end) (end None: no bound) that existed at `revision`, in key order.

    The keys are those of latest and tombstones merged (a key in both is in latest now:
    its chain runs through the delete).
    """
    limit = REV.pack(revision + 1, 0)
    live = txn.cursor(db=latest)
    dead = txn.cursor(db=tombs)
    k_live = live.key() if live.set_range(key) else None
    k_dead = dead.key() if dead.set_range(key) else None
    unpack = _MOD.unpack_from
    while True:
        if k_live is not None and (k_dead is None or k_live <= k_dead):
            k = k_live
            if end is not None and k >= end:
                return
            raw = live.value()
            if k_dead == k:
                k_dead = dead.key() if dead.next() else None
            k_live = live.key() if live.next() else None
            if unpack(raw, 8)[0] <= revision:
                yield k, Version(record_of(txn, hist, raw), None)
                continue
            found = _walk(txn, hist, k, raw[WRITE_KEY], limit)
        elif k_dead is not None:
            k = k_dead
            if end is not None and k >= end:
                return
            head = dead.value()
            k_dead = dead.key() if dead.next() else None
            found = _walk(txn, hist, k, head, limit)
        else:
            return
        if found is not None:
            yield k, found


def previous(txn: lmdb.Transaction[bytes], hist: lmdb._Database, ev: Event) -> Event | None:
    """The put of ev's key just before ev (a watch's prev_kv); None: absent before, or compacted."""
    if ev.prev == NO_PREV:
        return None
    raw = txn.get(ev.prev, db=hist)
    if raw is None or _is_delete(raw):
        return None
    return decode(ev.prev, raw)


def events_from(txn: lmdb.Transaction[bytes], hist: lmdb._Database, start: int,
                stop: int | None = None) -> Iterator[Event]:
    """Every event with revision >= start (and < stop, when given), in revision order."""
    cur = txn.cursor(db=hist)
    if not cur.set_range(REV.pack(start, 0)):
        return
    limit = None if stop is None else REV.pack(stop, 0)
    for hkey, raw in cur:
        if limit is not None and hkey >= limit:
            return
        yield decode(hkey, raw)


def compaction_start(compacted: int, resume: bytes | None) -> bytes:
    """Where the walk of a new compaction starts, the last one having compacted to `compacted`
    and stopped at `resume` (None: it finished)."""
    start = REV.pack(compacted, 0)
    return start if resume is None else min(resume, start)


def compact_step(txn: lmdb.Transaction[bytes], hist: lmdb._Database, tombs: lmdb._Database, compact_to: int,
                 resume: bytes, budget: int) -> bytes | None:
    """Visit up to `budget` events of the walk to compact_to, from history key `resume`, removing
    what they make obsolete (module docstring). Returns where to resume, or None once the walk is done.
    """
    cur = txn.cursor(db=hist)
    if not cur.set_range(resume):
        return None
    below = REV.pack(compact_to, 0)  # events below this may go
    stop = REV.pack(compact_to + 1, 0)  # the walk visits events up to compact_to
    doomed: list[bytes] = []
    deletes: list[tuple[bytes, bytes]] = []  # (history key, event) of deletes that go
    resume_at: bytes | None = None
    visited = 0
    for hkey, raw in cur:
        if hkey >= stop:
            break
        if visited >= budget:
            resume_at = hkey
            break
        visited += 1
        prev = raw[:_PREV_END]
        if prev != NO_PREV:  # below the event, so below compact_to (a key has one write per revision)
            doomed.append(prev)
        if _is_delete(raw) and hkey < below:
            deletes.append((hkey, raw))
    # Removed after the walk: only events already visited (a prev lies before its event).
    delete = txn.delete
    for hkey in doomed:
        delete(hkey, db=hist)
    for hkey, raw in deletes:
        delete(hkey, db=hist)
        key = decode(hkey, raw).key
        if txn.get(key, db=tombs) == hkey:
            delete(key, db=tombs)
    return resume_at
