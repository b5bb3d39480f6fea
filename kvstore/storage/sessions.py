"""The exactly-once session table, kept in LMDB beside the data it protects.

Every mutating command carries RequestId(client_id, seq, acked_below). The
table remembers, per client, the answer to every seq >= acked_below, so a
retried command (same client_id and seq, e.g. re-proposed after a leader
change) gets the original answer instead of being applied again. It is written
in the same LMDB transaction as the command's effects: the answer exists iff
the effects do.

Rules (identical on every replica, so all reach the same verdict):

* client_id 0: no exactly-once; the command is applied and nothing recorded.
* Log time is the largest Command.proposed_at_ms seen (the leader's clock,
  made monotonic here). A session whose last activity is more than `ttl_ms`
  of log time behind a command is dropped before that command is handled.
  The ttl must be the same on every member of a cluster.
* A retry of a seq whose answer is still stored gets that answer back.
* A seq below acked_below whose answer is gone is rejected
  (FAILED_PRECONDITION): its outcome cannot be told any more, so applying it
  would risk a double apply. A client never does this unless it is confused.
* An unknown client_id whose acked_below > 1 has had answers before, so its
  session expired (or was never seen by this cluster): rejected with
  FAILED_PRECONDITION, and the client must start a new session (new
  client_id). Because the rejection is deterministic, the rejected command was
  not applied anywhere and the client may safely resend it under the new id.
  The one case this cannot catch is a retry of a session's *first* requests
  (acked_below <= 1) arriving after the session expired; clients must
  therefore stop retrying a request well within ttl_ms (the client library's
  retry deadline is shorter than the ttl).
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

from .errors import ApplyError, ErrorCode

DEFAULT_SESSION_TTL_MS = 10 * 60 * 1000
DEFAULT_MAX_PENDING = 10_000

_SESSION = struct.Struct(">QQQ")  # last_seen_ms, acked_below, pending
_PAIR = struct.Struct(">QQ")  # (client_id, seq) or (last_seen_ms, client_id)
_CLIENT = struct.Struct(">Q")

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
    """Session bookkeeping inside a caller's LMDB write transaction."""

    def __init__(self, sessions_db, answers_db, expiry_db, *, ttl_ms: int, max_pending: int):
        self._sessions = sessions_db
        self._answers = answers_db
        self._expiry = expiry_db
        self.ttl_ms = ttl_ms
        self.max_pending = max_pending

    def expire(self, txn, now_ms: int) -> list[int]:
        """Drop every session idle for more than ttl_ms of log time; their ids."""
        dropped = []
        cur = txn.cursor(db=self._expiry)
        while cur.first():
            last_seen, client_id = _PAIR.unpack(cur.key())
            if now_ms <= last_seen + self.ttl_ms:
                break
            cur.delete()
            txn.delete(_CLIENT.pack(client_id), db=self._sessions)
            self._drop_answers(txn, client_id, 1 << 64)
            dropped.append(client_id)
        return dropped

    def check(
        self, txn, rid: kv_pb2.RequestId, now_ms: int
    ) -> tuple[Verdict, command_pb2.CommandResult | ApplyError | None]:
        """Decide what to do with a request (client_id != 0), touching its session."""
        cid, seq = rid.client_id, rid.seq
        ckey = _CLIENT.pack(cid)
        raw = txn.get(ckey, db=self._sessions)
        if raw is None:
            if rid.acked_below > 1:
                return Verdict.REJECT, ApplyError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"session of client {cid} expired or is unknown (acked_below="
                    f"{rid.acked_below}): its earlier answers are gone; start a new "
                    f"session with a new client_id",
                )
            last_seen, acked, pending = now_ms, 0, 0
        else:
            last_seen, acked, pending = _SESSION.unpack(raw)
            txn.delete(_PAIR.pack(last_seen, cid), db=self._expiry)
        if rid.acked_below > acked:
            pending -= self._drop_answers(txn, cid, rid.acked_below)
            acked = rid.acked_below
        txn.put(ckey, _SESSION.pack(now_ms, acked, pending), db=self._sessions)
        txn.put(_PAIR.pack(now_ms, cid), b"", db=self._expiry)

        stored = txn.get(_PAIR.pack(cid, seq), db=self._answers)
        if stored is not None:
            return Verdict.REPLAY, decode_answer(stored)
        if seq < acked:
            return Verdict.REJECT, ApplyError(
                ErrorCode.FAILED_PRECONDITION,
                f"request seq {seq} of client {cid} was answered and acknowledged "
                f"(acked_below={acked}); its answer is no longer kept",
            )
        if pending >= self.max_pending:
            return Verdict.REJECT, ApplyError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"client {cid} has {pending} unacknowledged answers; the limit is "
                f"{self.max_pending} (advance acked_below)",
            )
        return Verdict.APPLY, None

    def record(
        self, txn, rid: kv_pb2.RequestId, answer: command_pb2.CommandResult | ApplyError, puts_only: bool = False
    ) -> None:
        """Store the answer to a seq that check() said to APPLY (puts_only: see encode_answer)."""
        ckey = _CLIENT.pack(rid.client_id)
        last_seen, acked, pending = _SESSION.unpack(txn.get(ckey, db=self._sessions))
        if txn.put(_PAIR.pack(rid.client_id, rid.seq), encode_answer(answer, puts_only), db=self._answers):
            txn.put(ckey, _SESSION.pack(last_seen, acked, pending + 1), db=self._sessions)

    def _drop_answers(self, txn, cid: int, below_seq: int) -> int:
        """Delete the stored answers of client cid with seq < below_seq."""
        n = 0
        prefix = _CLIENT.pack(cid)
        end = _PAIR.pack(cid, below_seq) if below_seq < (1 << 64) else None
        cur = txn.cursor(db=self._answers)
        if not cur.set_range(prefix):
            return 0
        while True:
            k = cur.key()
            if not k.startswith(prefix) or (end is not None and k >= end):
                break
            n += 1
            if not cur.delete():  # moves to the next record; False at the end
                break
        return n

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
