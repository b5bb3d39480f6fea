"""Pending ReadIndex requests on the leader (Raft thesis §6.4).

A read is recorded with the leader's commit index when it arrives; it may be
answered once a quorum has acknowledged a heartbeat that carries its context,
proving nobody else was leader at that moment. Heartbeats are sent in order,
so a quorum for one request also confirms every request queued before it.
"""
from __future__ import annotations

from .types import Message


class ReadIndexStatus:
    __slots__ = ("req", "index", "acks")

    def __init__(self, req: Message, index: int) -> None:
        self.req = req
        self.index = index
        self.acks: set[int] = set()


class ReadOnly:
    def __init__(self) -> None:
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

    def add_request(self, index: int, req: Message) -> bool:
        ctx = req.context
        if ctx in self.pending:
            return False
        self.pending[ctx] = ReadIndexStatus(req, index)
        self.queue.append(ctx)
        return True

    def recv_ack(self, frm: int, ctx: bytes) -> set[int] | None:
        rs = self.pending.get(ctx)
        if rs is None:
            return None
        rs.acks.add(frm)
        return rs.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Pop and return every request up to and including ctx."""
        if ctx not in self.pending:
            return []
        i = self.queue.index(ctx)
        done = self.queue[: i + 1]
        del self.queue[: i + 1]
        return [self.pending.pop(c) for c in done]

    def last_pending_ctx(self) -> bytes | None:
        return self.queue[-1] if self.queue else None

    def reset(self) -> None:
        self.pending.clear()
        self.queue.clear()
