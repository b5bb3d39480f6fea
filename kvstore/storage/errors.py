"""How the state machine answers a command it will not apply.

`StateMachine.apply` never raises for a bad command: every replica must reach
the same verdict and go on applying the log. Instead the command's slot in the
result list holds an `ApplyError` (not a `CommandResult`), and nothing of that
command was applied. The code is a gRPC status code value so the server maps it
directly: ``grpc.StatusCode[err.code.name]``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kvstore.v1 import kv_pb2


class ErrorCode(enum.IntEnum):
    """The subset of grpc.StatusCode the state machine can answer with."""

    INVALID_ARGUMENT = 3  # malformed command or op; names the limit broken
    NOT_FOUND = 5  # a put or revoke names a lease that does not exist
    PERMISSION_DENIED = 7  # the command's user may not run one of its ops (auth_store.py)
    RESOURCE_EXHAUSTED = 8  # too many unacknowledged answers kept for one client
    FAILED_PRECONDITION = 9  # retry of a request whose answer was forgotten; an auth change that cannot apply
    OUT_OF_RANGE = 11  # a revision already compacted, or not yet reached
    UNAUTHENTICATED = 16  # auth is enabled and the command carries no known user


#: How every refusal of a request whose session the cluster no longer holds begins
#: (FAILED_PRECONDITION); the client library types it as SessionExpired by it.
SESSION_EXPIRED = "session expired"

#: How every refusal of a write past the space quota begins (RESOURCE_EXHAUSTED; see quota.py);
#: the client library types it as NoSpace and does not retry it.
NO_SPACE = "database space exceeded"

#: How Authenticate is refused (FAILED_PRECONDITION) while auth is disabled; the client then sends no token.
AUTH_NOT_ENABLED = "auth is not enabled"


@dataclass(frozen=True, slots=True)
class ApplyError:
    """A command rejected as a whole, deterministically, by every replica."""

    code: ErrorCode
    message: str

    def to_proto(self) -> kv_pb2.OpError:
        return kv_pb2.OpError(code=int(self.code), message=self.message)

    @classmethod
    def from_proto(cls, err: kv_pb2.OpError) -> ApplyError:
        return cls(ErrorCode(err.code), err.message)


class InvalidRequest(Exception):
    """Raised by validation; turned into an ApplyError with its `code` (INVALID_ARGUMENT unless a subclass says)."""

    code = ErrorCode.INVALID_ARGUMENT
