"""Typed client errors, all under :class:`KvstoreError`.

Callers catch these instead of ``grpc.RpcError`` so that a missing cluster, a
lost leader or a bad request each read as what they are. A failed txn compare
is *not* an error (see ``TxnResult.succeeded``).
"""
from __future__ import annotations

from collections.abc import Mapping

import grpc

from kvstore.storage.errors import NO_SPACE, SESSION_EXPIRED

__all__ = [
    "KvstoreError",
    "Unavailable",
    "NotLeader",
    "NoLeader",
    "NoEndpointAnswered",
    "DeadlineExceeded",
    "InvalidArgument",
    "FailedPrecondition",
    "SessionExpired",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "Cancelled",
    "InternalError",
    "ClientClosed",
    "from_status",
]


class KvstoreError(Exception):
    """Base class of every error the client raises.

    ``code`` is the gRPC status behind the error when there is one;
    ``endpoint`` the member that reported it.
    """

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint


class Unavailable(KvstoreError):
    """The cluster (or one member) could not serve the request right now."""

    code = grpc.StatusCode.UNAVAILABLE


class NotLeader(Unavailable):
    """A follower refused a request that only the leader may serve.

    The client follows these itself; callers only see one when retries are
    exhausted while the cluster keeps pointing somewhere unreachable.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        leader_id: int = 0,
        leader_addr: str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint)
        self.leader_id = leader_id
        self.leader_addr = leader_addr


class NoLeader(Unavailable):
    """The member knows of no leader (an election is in progress)."""


class _AttemptsSummary:
    """Mixin: how a retried call failed, per endpoint.

    ``causes`` maps each endpoint tried to the last reason it failed;
    ``maybe_applied`` is True when a mutation was sent and no answer proved it
    was not applied (the outcome is unknown, as in Jepsen's ``info``).
    """

    attempts: int
    causes: dict[str, str]
    maybe_applied: bool

    def _init_summary(self, attempts: int, causes: Mapping[str, str], maybe_applied: bool) -> None:
        self.attempts = attempts
        self.causes = dict(causes)
        self.maybe_applied = maybe_applied

    @staticmethod
    def _describe(causes: Mapping[str, str]) -> str:
        if not causes:
            return "no endpoint was tried"
        return "; ".join(f"{ep}: {why}" for ep, why in causes.items())


class NoEndpointAnswered(Unavailable, _AttemptsSummary):
    """Retries ran out and no endpoint served the call; lists each and why."""

    def __init__(self, attempts: int, causes: Mapping[str, str], *, maybe_applied: bool = False) -> None:
        self._init_summary(attempts, causes, maybe_applied)
        super().__init__(
            f"no endpoint answered after {attempts} attempt(s): {self._describe(causes)}"
        )


class DeadlineExceeded(KvstoreError, _AttemptsSummary):
    """The call's total deadline ran out; says how many attempts and why each endpoint failed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(
        self, attempts: int, causes: Mapping[str, str], *, timeout: float, maybe_applied: bool = False
    ) -> None:
        self._init_summary(attempts, causes, maybe_applied)
        self.timeout = timeout
        super().__init__(
            f"deadline of {timeout:g}s exceeded after {attempts} attempt(s); "
            f"last cause per endpoint: {self._describe(causes)}"
        )


class InvalidArgument(KvstoreError):
    """The request broke a rule or a limit (the message names it); nothing was applied."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(KvstoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SessionExpired(FailedPrecondition):
    """The cluster no longer holds this client's session (it expired or was evicted),
    so it refused the request rather than risk applying a retry twice.

    The refused attempt was applied nowhere, but an earlier attempt of the same
    call may have been (``maybe_applied``): the outcome of such a call is
    unknown. Retrying cannot help; the client has already moved on to a new
    session, so the caller may issue new calls at once.
    """

    maybe_applied: bool = True


class NotFound(KvstoreError):
    """What the request names does not exist (e.g. "lease not found"); nothing was applied."""

    code = grpc.StatusCode.NOT_FOUND


class LeaseLost(KvstoreError):
    """A lease kept alive by the client ran out or was revoked: keys attached to it may be gone."""


class ResourceExhausted(KvstoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(KvstoreError):
    """Auth is enabled and the call had no valid credentials: a wrong user name or password, or too many
    failed attempts (the message says which). This attempt applied nothing; for a write retried after an
    earlier attempt's outcome was lost, ``maybe_applied`` says whether that one may have been."""

    code = grpc.StatusCode.UNAUTHENTICATED
    maybe_applied: bool = False


class PermissionDenied(KvstoreError):
    """The user's roles do not allow the call; the message names the access and the key or range
    (inside a txn, which op). This attempt applied nothing (``maybe_applied``: as for Unauthenticated)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    maybe_applied: bool = False


class OutOfRange(KvstoreError):
    """A revision outside the history: compacted away, or not reached yet."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Compacted(OutOfRange):
    """The revision asked for has been compacted (etcd's ErrCompacted)."""


class FutureRevision(OutOfRange):
    """The revision asked for is beyond the store's current one (etcd's ErrFutureRev)."""


class NoSpace(ResourceExhausted):
    """The store is past its --quota-backend-bytes: writes that add data are refused until
    deletes and a compaction free space (reads, deletes and compaction still work)."""


def is_final(code: grpc.StatusCode, message: str) -> bool:
    """A status of a retryable code that a retry cannot change (a full store)."""
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith(NO_SPACE)


class Cancelled(KvstoreError):
    code = grpc.StatusCode.CANCELLED


class InternalError(KvstoreError):
    """Any other status from the server (``code`` says which)."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, endpoint: str | None = None) -> None:
        super().__init__(message, endpoint=endpoint)
        self.code = code


class ClientClosed(KvstoreError):
    """The client was closed while (or before) the call ran."""


_BY_CODE: dict[grpc.StatusCode, type[KvstoreError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}

_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode for the integer in an ``OpError``."""
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode, message: str, endpoint: str | None = None) -> KvstoreError:
    """Map a final (not retried) gRPC status to its typed error."""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(1, {endpoint or "?": message}, timeout=0.0)
    if code is grpc.StatusCode.FAILED_PRECONDITION and message.startswith(SESSION_EXPIRED):
        return SessionExpired(message, endpoint=endpoint)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith(NO_SPACE):
        return NoSpace(message, endpoint=endpoint)
    if code is grpc.StatusCode.OUT_OF_RANGE:
        return (Compacted if "compacted" in message else FutureRevision if "future" in message
                else OutOfRange)(message, endpoint=endpoint)
    cls = _BY_CODE.get(code)
    if cls is None:
        return InternalError(f"{code.name}: {message}", code=code, endpoint=endpoint)
    return cls(message, endpoint=endpoint)
