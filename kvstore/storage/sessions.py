"""The exactly-once session table, kept in LMDB beside the data it protects.

Every mutating command carries RequestId(client_id, seq, acked_below). The
table remembers, per client, the answer to every seq >= acked_below, so a
retried command (same client_id and seq, e.g. re-proposed after a leader
change) gets the original answer instead of being applied again. It is written
in the same LMDB transaction as the command's effects: the answer exists iff
the effects do.

Rules (identical on every replica, so all reach the same verdict):

* client_id 0: no exactly-once; the command is applied and nothing recorded.
* Log time (log_clock.py) follows the leaders' monotonic clocks, never a
  wall clock. A session whose last activity is more than `ttl_ms` of log
  time behind a command is dropped before that command is handled. The ttl
  must be the same on every member of a cluster.
* Only a request with RequestId.opens_session and seq 1 creates a session
  (the client sets the flag while no earlier attempt of seq 1 may have been
  applied, so at most one entry per client_id can ever carry it into the
  state machine). Every other request of a client_id without a session is
  refused with FAILED_PRECONDITION "session expired: ...": its session
  expired or was evicted, and the request may be the retry of one applied
  under it, so applying it could apply it twice. The refusal is
  deterministic, so it was applied nowhere; the client starts a new session.
* At most `max_sessions` sessions are kept: creating one more evicts the least
  recently used other session (smallest (last_seen, client_id)), whose later
  requests are then refused as above.
* A retry of a seq whose answer is still stored gets that answer back.
* A seq below acked_below whose answer is gone is rejected
  (FAILED_PRECONDITION): its outcome cannot be told any more, so applying it
  would risk a double apply. A client never does this unless it is confused.
* At most `max_pending` answers are kept per client (seqs not yet acked);
  a new seq beyond that is rejected with RESOURCE_EXHAUSTED.

Layout: `sessions` maps client_id -> (last_seen_ms, acked_below, pending);
`answers` maps (client_id, seq) -> tagged answer; `expiry` maps
(last_seen_ms, client_id) -> b"" so expiry only looks at the oldest entries.
"""
from __future__ import annotations

import enum
import struct

from kvstore.v1 import command_pb2, kv_pb2

from .errors import SESSION_EXPIRED, ApplyError, ErrorCode
from .plain_puts import PlainPuts

DEFAULT_SESSION_TTL_MS = 10 * 60 * 1000
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_SESSIONS = 100_000

_SESSION = struct.Struct(">QQQ")  # last_seen_ms, acked_below, pending
_PAIR = struct.Struct(">QQ")  # (client_id, seq) or (last_seen_ms, client_id)
_CLIENT = struct.Struct(">Q")
# Up to this many acknowledged seqs are deleted key by key; more take a cursor walk.
_DIRECT_DELETES = 32

_TAG_RESULT = b"R"
_TAG_ERROR = b"E"
_TAG_PUTS = b"P"  # (n, revision): n plain puts, revisions revision-n+1 .. revision


def encode_answer(answer: command_pb2.CommandResult | ApplyError, puts_only: bool = False) -> bytes:
    """The stored form of an answer; decode_answer gives back an equal message.

    puts_only: the caller vouches that the result is exactly n put responses,
    each with only header.revision set, numbered consecutively up to
    answer.revision (what a command of plain puts yields). Then only
    (n, revision) is stored: 17 bytes instead of serializing up to a whole
    Batch of responses on every applied command. A retry rebuilds the same
    message, so it serializes to the same bytes.
    """
    if isinstance(answer, ApplyError):
        return _TAG_ERROR + answer.to_proto().SerializeToString()
    if type(answer) is PlainPuts:
        return _TAG_PUTS + _PAIR.pack(answer.n, answer.revision)
    if puts_only:
        return _TAG_PUTS + _PAIR.pack(len(answer.responses), answer.revision)
    return _TAG_RESULT + answer.SerializeToString()


def decode_answer(raw: bytes) -> command_pb2.CommandResult | ApplyError:
    tag = raw[:1]
    if tag == _TAG_ERROR:
        return ApplyError.from_proto(kv_pb2.OpError.FromString(raw[1:]))
    if tag == _TAG_PUTS:
        n, revision = _PAIR.unpack_from(raw, 1)
        result = command_pb2.CommandResult(revision=revision)
        for rev in range(revision - n + 1, revision + 1):
            result.responses.add().response_put.header.revision = rev
        return result
    return command_pb2.CommandResult.FromString(raw[1:])


class Verdict(enum.Enum):
    APPLY = "apply"  # new seq: apply it, then record() its answer
    REPLAY = "replay"  # answered before: return the stored answer
    REJECT = "reject"  # cannot be applied safely: return the error


class SessionTable:
    """Session bookkeeping inside a caller's LMDB write transaction (see batch())."""

    def __init__(
        self, sessions_db, answers_db, expiry_db, *, ttl_ms: int, max_pending: int, max_sessions: int
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self._sessions = sessions_db
        self._answers = answers_db
        self._expiry = expiry_db
        self.ttl_ms = ttl_ms
        self.max_pending = max_pending
        self.max_sessions = max_sessions
        # Test switch, never set outside tests: an unknown client with acked_below <= 1 gets a
        # new session without opens_session (the rule that let a retry apply twice).
        self.testing_open_implicitly = False
        # client_id -> an upper bound of the seqs whose answers are stored. A
        # request above it cannot be a retry, so its answer lookup is skipped
        # (every py-lmdb call drops and retakes the GIL, which is what a call
        # costs on a busy node). Filled from LMDB on a client's first request
        # in this process; a bound left too high (a transaction that did not
        # commit) only costs a lookup.
        self._seq_bound: dict[int, int] = {}

    def batch(self, txn) -> SessionBatch:
        """The table as seen by one apply transaction; call flush() before committing."""
        return SessionBatch(self, txn)

    def dump(self, txn) -> dict[int, tuple[int, int, dict[int, bytes]]]:
        """client_id -> (last_seen_ms, acked_below, {seq: encoded answer}); for tests."""
        out: dict[int, tuple[int, int, dict[int, bytes]]] = {}
        for k, v in txn.cursor(db=self._sessions):
            last_seen, acked, _ = _SESSION.unpack(v)
            out[_CLIENT.unpack(k)[0]] = (last_seen, acked, {})
        for k, v in txn.cursor(db=self._answers):
            cid, seq = _PAIR.unpack(k)
            out[cid][2][seq] = v
        return out


class SessionBatch:
    """The session table during one apply batch: each session read once, written once.

    An apply batch holds many commands of the same few clients (a client
    library numbers all its calls under one client_id). Reading, rewriting and
    re-indexing a session row per command was most of the cost of applying a
    small command, so a session touched in this batch lives in `_live`
    (client_id -> [last_seen, acked_below, pending]) and is written back, with
    its expiry entry, by flush(). The rules and the final state are exactly
    those of handling each command on its own (the model tests compare a batch
    with one-by-one apply):

    * when a session is first touched, its expiry entry is deleted, so the
      expiry index holds only sessions not in `_live`; expire() looks at both;
    * a session dropped by expire() or evicted has its row deleted at once, so
      a later command of the same client in this batch finds no session;
    * eviction picks the least recently used session over both the expiry
      index and `_live` (see _evict_lru).
    """

    def __init__(self, table: SessionTable, txn):
        self._t = table
        self._txn = txn
        self._live: dict[int, list[int]] = {}
        self._count = txn.stat(table._sessions)["entries"]  # sessions held, kept up to date below
        # Lower bounds, so expire() rarely touches LMDB: the oldest last_seen in
        # the expiry index (None: not read yet; -1: empty) and in _live.
        self._oldest_stored: int | None = None
        self._oldest_live = 1 << 64

    # ---- expiry ------------------------------------------------------------

    def expire(self, now_ms: int) -> None:
        """Drop every session idle for more than ttl_ms of log time before now_ms."""
        ttl = self._t.ttl_ms
        if self._oldest_stored is None:
            self._oldest_stored = self._first_stored()
        if 0 <= self._oldest_stored and now_ms > self._oldest_stored + ttl:
            self._expire_stored(now_ms)
        if now_ms > self._oldest_live + ttl:
            for cid in [c for c, s in self._live.items() if now_ms > s[0] + ttl]:
                del self._live[cid]
                self._drop_session(cid)
            self._oldest_live = min((s[0] for s in self._live.values()), default=1 << 64)

    def _first_stored(self) -> int:
        cur = self._txn.cursor(db=self._t._expiry)
        return _PAIR.unpack(cur.key())[0] if cur.first() else -1

    def _expire_stored(self, now_ms: int) -> None:
        txn, ttl = self._txn, self._t.ttl_ms
        cur = txn.cursor(db=self._t._expiry)
        oldest = -1
        while cur.first():
            last_seen, client_id = _PAIR.unpack(cur.key())
            if now_ms <= last_seen + ttl:
                oldest = last_seen
                break
            cur.delete()
            self._drop_session(client_id)
        self._oldest_stored = oldest

    def _drop_session(self, cid: int) -> None:
        self._count -= 1
        self._txn.delete(_CLIENT.pack(cid), db=self._t._sessions)
        self._drop_answers(cid, 0, 1 << 64)
        self._t._seq_bound.pop(cid, None)

    def _stored_seq_bound(self, cid: int) -> int:
        """The highest seq with a stored answer for cid (0 if none), read once per process."""
        bound = self._t._seq_bound.get(cid)
        if bound is None:
            bound = 0
            cur = self._txn.cursor(db=self._t._answers)
            after = cid + 1 < (1 << 64) and cur.set_range(_CLIENT.pack(cid + 1))  # cid's last answer is before
            found = cur.prev() if after else cur.last()
            if found:
                k_cid, k_seq = _PAIR.unpack(cur.key())
                if k_cid == cid:
                    bound = k_seq
            self._t._seq_bound[cid] = bound
        return bound

    # ---- requests ----------------------------------------------------------

    def check(
        self, rid: kv_pb2.RequestId, now_ms: int
    ) -> tuple[Verdict, command_pb2.CommandResult | ApplyError | None]:
        """Decide what to do with a request (client_id != 0), touching its session."""
        cid, seq, acked_below = rid.client_id, rid.seq, rid.acked_below
        s = self._live.get(cid)
        if s is None:
            txn = self._txn
            raw = txn.get(_CLIENT.pack(cid), db=self._t._sessions)
            if raw is None:
                if not (rid.opens_session and seq == 1) and not (
                    self._t.testing_open_implicitly and acked_below <= 1
                ):
                    return Verdict.REJECT, self._expired(cid, seq)
                s = [now_ms, 0, 0]
                self._count += 1
                while self._count > self._t.max_sessions and self._evict_lru(cid):
                    pass  # one at a time; more only if the limit was lowered since
            else:
                s = list(_SESSION.unpack(raw))
                txn.delete(_PAIR.pack(s[0], cid), db=self._t._expiry)
            self._live[cid] = s
            if now_ms < self._oldest_live:
                self._oldest_live = now_ms
        s[0] = now_ms
        if acked_below > s[1]:
            if s[2]:
                s[2] -= self._drop_answers(cid, s[1], acked_below)
            s[1] = acked_below
        if s[2] and seq <= self._stored_seq_bound(cid):  # else no answer can be stored for seq
            stored = self._txn.get(_PAIR.pack(cid, seq), db=self._t._answers)
            if stored is not None:
                return Verdict.REPLAY, decode_answer(stored)
        if seq < s[1]:
            return Verdict.REJECT, ApplyError(
                ErrorCode.FAILED_PRECONDITION,
                f"request seq {seq} of client {cid} was answered and acknowledged "
                f"(acked_below={s[1]}); its answer is no longer kept",
            )
        if s[2] >= self._t.max_pending:
            return Verdict.REJECT, ApplyError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"client {cid} has {s[2]} unacknowledged answers; the limit is "
                f"{self._t.max_pending} (advance acked_below)",
            )
        return Verdict.APPLY, None

    def _expired(self, cid: int, seq: int) -> ApplyError:
        t = self._t
        return ApplyError(
            ErrorCode.FAILED_PRECONDITION,
            f"{SESSION_EXPIRED}: client {cid} has no session (idle for over {t.ttl_ms} ms of log "
            f"time, or evicted as the least recently used of {t.max_sessions}); seq {seq} is "
            f"refused, not applied, as it may retry a request applied under that session; "
            f"start a new session (new client_id)",
        )

    def _evict_lru(self, keep: int) -> bool:
        """Drop the session with the smallest (last_seen, client_id), other than `keep`;
        False if there is none."""
        stored = None
        cur = self._txn.cursor(db=self._t._expiry)
        if cur.first():
            stored = _PAIR.unpack(cur.key())  # the expiry index holds no session of _live
        live = min(((s[0], c) for c, s in self._live.items() if c != keep), default=None)
        if live is not None and (stored is None or live < stored):
            del self._live[live[1]]
            self._drop_session(live[1])
            self._oldest_live = min((s[0] for s in self._live.values()), default=1 << 64)
        elif stored is not None:
            cur.delete()
            self._drop_session(stored[1])
            self._oldest_stored = None  # read again when next needed
        else:
            return False
        return True

    def record(
        self, rid: kv_pb2.RequestId, answer: command_pb2.CommandResult | ApplyError, puts_only: bool = False
    ) -> None:
        """Store the answer to a seq that check() said to APPLY (puts_only: see encode_answer)."""
        cid, seq = rid.client_id, rid.seq
        self._txn.put(_PAIR.pack(cid, seq), encode_answer(answer, puts_only), db=self._t._answers)
        self._live[cid][2] += 1
        bounds = self._t._seq_bound
        if cid not in bounds:  # no answer was stored before (pending was 0), so none above seq
            bounds[cid] = seq
        elif seq > bounds[cid]:
            bounds[cid] = seq

    def flush(self) -> None:
        """Write every session touched in this batch, and its expiry entry."""
        txn, sessions, expiry = self._txn, self._t._sessions, self._t._expiry
        for cid, (last_seen, acked, pending) in self._live.items():
            txn.put(_CLIENT.pack(cid), _SESSION.pack(last_seen, acked, pending), db=sessions)
            txn.put(_PAIR.pack(last_seen, cid), b"", db=expiry)
        self._live.clear()

    def _drop_answers(self, cid: int, from_seq: int, below_seq: int) -> int:
        """Delete the stored answers of client cid with from_seq <= seq < below_seq."""
        txn, answers = self._txn, self._t._answers
        if below_seq - from_seq <= _DIRECT_DELETES:  # the usual case: acked_below moved by a few
            return sum(txn.delete(_PAIR.pack(cid, q), db=answers) for q in range(from_seq, below_seq))
        n = 0
        prefix = _CLIENT.pack(cid)
        end = _PAIR.pack(cid, below_seq) if below_seq < (1 << 64) else None
        cur = txn.cursor(db=answers)
        if not cur.set_range(_PAIR.pack(cid, from_seq)):
            return 0
        while True:
            k = cur.key()
            if not k.startswith(prefix) or (end is not None and k >= end):
                break
            n += 1
            if not cur.delete():  # moves to the next record; False at the end
                break
        return n
