"""PlainPuts: the result of a command of plain puts, without a message per put.

Nearly all write traffic is Batches of plain puts (no prev_kv). Their result
is two numbers: n puts took the consecutive revisions ending at `revision`.
Every member applies every command, but only the proposing member reads the
answer, so building n ResponseOp messages on each of them (~1 us per put)
was wasted on the others. The state machine returns this instead; the service
fills its response from the two numbers, and `to_proto()` builds the full
CommandResult for anyone who wants the messages.
"""
from __future__ import annotations

from kvstore.v1 import command_pb2

__all__ = ["PlainPuts"]


class PlainPuts:
    __slots__ = ("n", "revision", "_proto")

    def __init__(self, n: int, revision: int) -> None:
        self.n = n
        self.revision = revision  # of the last put: the command's revision
        self._proto: command_pb2.CommandResult | None = None

    @property
    def first_revision(self) -> int:
        return self.revision - self.n + 1

    def to_proto(self) -> command_pb2.CommandResult:
        """The CommandResult run_command would have built: one put response per put."""
        if self._proto is None:
            result = command_pb2.CommandResult(revision=self.revision)
            add = result.responses.add
            for rev in range(self.first_revision, self.revision + 1):
                add().response_put.header.revision = rev
            self._proto = result
        return self._proto

    @property
    def responses(self):
        return self.to_proto().responses

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PlainPuts):
            return (self.n, self.revision) == (other.n, other.revision)
        if isinstance(other, command_pb2.CommandResult):
            return self.to_proto() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-equal to a message

    def __repr__(self) -> str:
        return f"PlainPuts(n={self.n}, revision={self.revision})"
