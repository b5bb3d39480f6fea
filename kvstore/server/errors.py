"""How the server fails a request, and what the failure promises the client.

Every error a client can see is a `RequestFailed`: a gRPC status code, a
message a person can act on, and trailing metadata a program can act on. The
one promise that matters to a retrying client (and to the Jepsen harness) is
whether the request was certainly NOT applied: errors raised before anything
was proposed carry `kvstore-not-applied: 1`; errors after a proposal (the
leader stepped down, the deadline passed) do not, because the command may
still commit.
"""
from __future__ import annotations

import grpc

NOT_APPLIED_KEY = "kvstore-not-applied"
LEADER_ID_KEY = "kvstore-leader-id"
LEADER_ADDR_KEY = "kvstore-leader-addr"


class RequestFailed(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        not_applied: bool,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.not_applied = not_applied
        self.metadata = metadata

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        md = tuple(self.metadata)
        if self.not_applied:
            md += ((NOT_APPLIED_KEY, "1"),)
        return md

    async def abort(self, context: grpc.aio.ServicerContext):
        """Fail the RPC with this error (raises, as context.abort does)."""
        await context.abort(self.code, self.message, trailing_metadata=self.trailing_metadata())


def invalid_argument(message: str) -> RequestFailed:
    return RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, message, not_applied=True)


def not_applied(code: grpc.StatusCode, message: str) -> RequestFailed:
    return RequestFailed(code, message, not_applied=True)


def leadership_lost() -> RequestFailed:
    return RequestFailed(grpc.StatusCode.UNAVAILABLE, "leadership lost; outcome unknown", not_applied=False)


def outcome_unknown_deadline() -> RequestFailed:
    return RequestFailed(
        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the write committed; outcome unknown",
        not_applied=False,
    )


def shutting_down() -> RequestFailed:
    """Refused at the door: the request never reached raft."""
    return RequestFailed(grpc.StatusCode.UNAVAILABLE, "node is shutting down", not_applied=True)


def stopped_while_pending() -> RequestFailed:
    """The node stopped after proposing: the entry may still commit elsewhere."""
    return RequestFailed(grpc.StatusCode.UNAVAILABLE, "node stopped; outcome unknown", not_applied=False)
