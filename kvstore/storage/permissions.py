"""Whether a user's roles allow an op: key ranges covered by READ or WRITE permissions.

A permission covers the single key ``key`` (empty range_end), the range
``[key, range_end)``, or every key >= key (range_end "\\0"), as a RangeRequest
would select. A user's permissions of one kind are merged into disjoint
intervals once per auth revision (``UserPermissions``); a request is allowed
when its whole range lies inside one of them (etcd checks the same way: a
range read needs permission on every key it could return, not just those that
exist).

The same check runs on the member that receives a request (to refuse it before
anything is proposed, naming what is missing) and in the state machine when the
command is applied (so a permission revoked while a write was in flight still
holds, on every member alike).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable

from kvstore.v1 import auth_pb2, kv_pb2

from .keys import ALL_KEYS_END

__all__ = ["UserPermissions", "Denied", "ROOT_ROLE", "ROOT_USER", "READ", "WRITE"]

ROOT_USER = "root"
ROOT_ROLE = "root"
READ = "read"
WRITE = "write"

_READS = (auth_pb2.Permission.READ, auth_pb2.Permission.READWRITE)
_WRITES = (auth_pb2.Permission.WRITE, auth_pb2.Permission.READWRITE)

#: Test switch (the teeth of the txn check): ops nested inside a txn are not checked.
#: Set in a member by --testing-auth-skip-txn-check; never outside tests.
testing_skip_txn_ops = False


class Denied(Exception):
    """An op the user may not run; the message names the user, the access and the key or range."""


def interval(key: bytes, range_end: bytes) -> tuple[bytes, bytes | None]:
    """[start, end) of a request's key selection; end None means no upper bound."""
    if not range_end:
        return key, key + b"\0"
    if range_end == ALL_KEYS_END:
        return key, None
    return key, range_end


def _merged(spans: Iterable[tuple[bytes, bytes | None]]) -> tuple[list[bytes], list[bytes | None]]:
    """Disjoint, sorted intervals covering the union of ``spans`` (touching ones joined)."""
    starts: list[bytes] = []
    ends: list[bytes | None] = []
    for start, end in sorted(spans, key=lambda s: s[0]):
        if end is not None and end <= start:
            continue
        if starts and (ends[-1] is None or start <= ends[-1]):
            last = ends[-1]
            if last is not None and (end is None or end > last):
                ends[-1] = end
            continue
        starts.append(start)
        ends.append(end)
    return starts, ends


def _describe(key: bytes, range_end: bytes) -> str:
    if not range_end:
        return repr(key.decode("utf-8", "backslashreplace"))
    if range_end == ALL_KEYS_END:
        return f"every key from {key.decode('utf-8', 'backslashreplace')!r}"
    return f"[{key.decode('utf-8', 'backslashreplace')!r}, {range_end.decode('utf-8', 'backslashreplace')!r})"


class UserPermissions:
    """What one user may read and write (at one auth revision)."""

    __slots__ = ("user", "root", "revision", "_read", "_write")

    def __init__(self, user: str, root: bool, perms: Iterable[auth_pb2.Permission], revision: int = 0) -> None:
        self.user = user
        self.root = root
        self.revision = revision  # the auth revision these permissions are of
        perms = list(perms)
        self._read = _merged(interval(p.key, p.range_end) for p in perms if p.perm_type in _READS)
        self._write = _merged(interval(p.key, p.range_end) for p in perms if p.perm_type in _WRITES)

    def allows(self, access: str, key: bytes, range_end: bytes = b"") -> bool:
        if self.root:
            return True
        starts, ends = self._read if access == READ else self._write
        if not range_end:  # one key, the common case: no interval built
            i = bisect.bisect_right(starts, key) - 1
            if i < 0:
                return False
            have = ends[i]
            return have is None or key < have
        start, end = interval(key, range_end)
        i = bisect.bisect_right(starts, start) - 1
        if i < 0:
            return False
        have = ends[i]
        if have is None:
            return True
        return end is not None and end <= have

    def check(self, access: str, key: bytes, range_end: bytes = b"", where: str = "") -> None:
        """Raise Denied unless the user may ``access`` the selection."""
        if not self.allows(access, key, range_end):
            raise Denied(f"permission denied: user {self.user!r} has no {access} permission on "
                         f"{_describe(key, range_end)}{where}")

    def check_op(self, op: kv_pb2.RequestOp, where: str = "") -> None:
        """Check one op; for a txn, every compare and every op of both branches (either may run)."""
        if self.root:
            return
        kind = op.WhichOneof("request")
        if kind == "request_put":  # the bulk of any write load: the single-key test inline
            key = op.request_put.key
            starts, ends = self._write
            i = bisect.bisect_right(starts, key) - 1
            if i < 0 or not (ends[i] is None or key < ends[i]):  # type: ignore[operator]
                self.check(WRITE, key, b"", where)  # raises, naming it
        elif kind == "request_range":
            r = op.request_range
            self.check(READ, r.key, r.range_end, where)
        elif kind == "request_delete_range":
            d = op.request_delete_range
            self.check(WRITE, d.key, d.range_end, where)
        elif kind == "request_txn":
            if testing_skip_txn_ops:
                return
            self.check_txn(op.request_txn, where)

    def check_txn(self, txn: kv_pb2.TxnRequest, where: str = "") -> None:
        for i, c in enumerate(txn.compare):
            self.check(READ, c.key, b"", f" (txn compare {i}{where})")
        for branch, ops in (("success", txn.success), ("failure", txn.failure)):
            for i, op in enumerate(ops):
                self.check_op(op, f" (txn {branch} op {i}{where})")
