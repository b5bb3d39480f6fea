"""Corruption detection: compare every member's key/value hash at the same log index.

How members hash the same point: the leader proposes a hash barrier (an
internal command, see kvstore.storage.hash_kv); every member hashes its state
when it applies that entry, and remembers the hash by the entry's index. The
leader's own hash comes back as the barrier's result; each other member is
asked for its hash at that index (Maintenance.HashKV), and answers once it has
applied it. Members whose hash (or revision) differs from the majority's are
corrupt.

What follows from a mismatch: the leader's periodic check (--corrupt-check-time)
raises a CORRUPT alarm about each such member through the log, so every member
knows it and it survives restarts. A leader with a CORRUPT alarm hands
leadership to another member. A member with a CORRUPT alarm refuses reads
(`check_not_corrupt`), /health reports the alarm, `kvstore status` lists it
and kvstore_server_alarms_active{alarm="CORRUPT"} counts it. `kvstore alarm
disarm` clears it once the member is rebuilt.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

import grpc

from kvstore.storage.alarms import CORRUPT
from kvstore.storage.hash_kv import HashMark
from kvstore.storage.state_machine import HASHES_KEPT
from kvstore.v1 import command_pb2, maintenance_pb2, maintenance_pb2_grpc

from .auth_guard import member_metadata
from .errors import RequestFailed

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("kvstore.corruption")

HASH_TIMEOUT_S = 10.0  # a barrier must commit and every member apply it within this


def check_not_corrupt(node: Node) -> None:
    """Refuse a read on a member the cluster has found corrupt: its answers would be wrong."""
    assert node.sm is not None  # started
    alarms = node.sm.alarms
    if alarms and (node.id, CORRUPT) in alarms:
        raise RequestFailed(grpc.StatusCode.DATA_LOSS,
                            f"member {node.id} has a CORRUPT alarm (its data differs from the other members'): "
                            "it serves no reads", not_applied=True)


async def leader_hash(node: Node, timeout: float = HASH_TIMEOUT_S) -> HashMark:
    """Place a hash barrier in the log (leader only); this member's hash there."""
    mark = await node.propose_internal(command_pb2.Command(hash_barrier=True), timeout)
    if not isinstance(mark, HashMark):
        raise RequestFailed(grpc.StatusCode.INTERNAL, f"the hash barrier applied as {mark!r}, not a hash",
                            not_applied=False)
    return mark


async def member_hash(node: Node, index: int, timeout: float = HASH_TIMEOUT_S) -> HashMark:
    """This member's hash at the barrier at `index`, once it has applied it."""
    sm = node.sm
    assert sm is not None  # started
    try:
        await asyncio.wait_for(node.wait_applied(index), timeout)
    except TimeoutError:
        raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"member {node.id} did not apply index {index} within {timeout:.0f}s "
                            f"(applied {sm.applied_index})", not_applied=True) from None
    mark = sm.hash_at(index)
    if mark is None:
        raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                            f"member {node.id} has no hash at index {index}: no barrier there, it installed "
                            f"a snapshot past it, or it is older than the last {HASHES_KEPT} barriers",
                            not_applied=True)
    return mark


def differing(marks: dict[int, HashMark]) -> list[int]:
    """The members whose (revision, hash) differs from the majority's, sorted; [] if all agree.

    Raises ValueError when the answers disagree and no majority of them agrees
    (say two members, two hashes): then nobody can tell which one is wrong.
    """
    votes = Counter((m.revision, m.hash) for m in marks.values())
    if len(votes) <= 1:
        return []
    top, n = votes.most_common(1)[0]
    if 2 * n <= len(marks):
        raise ValueError("members disagree and no majority agrees: " +
                         ", ".join(f"member {i}: {m.hash:08x} at revision {m.revision}"
                                   for i, m in sorted(marks.items())))
    return sorted(i for i, m in marks.items() if (m.revision, m.hash) != top)


class CorruptionChecker:
    """The leader's periodic check (etcd's --experimental-corrupt-check-time)."""

    def __init__(self, node: Node, interval_s: float) -> None:
        self.node = node
        self.interval_s = interval_s
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._task: asyncio.Task | None = None
        self.checks = 0  # completed checks, for tests and logs

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="corrupt-check")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            node = self.node
            if not node.is_leader or node.draining or node.sm is None:
                continue
            try:
                if (node.id, CORRUPT) in node.sm.alarms:
                    # A corrupt leader would answer every linearizable read with an error: step aside.
                    log.warning("member %d has a CORRUPT alarm: handing leadership over", node.id)
                    await node.transfer_leadership(0, HASH_TIMEOUT_S)
                else:
                    await self.check_once()
            except (RequestFailed, grpc.RpcError, ValueError) as e:
                log.warning("corruption check failed: %s", getattr(e, "message", None) or e)

    def _channel(self, peer_id: int) -> grpc.aio.Channel:
        """A channel to a member's client API; with client TLS on, verified against the member's CA
        files and presenting this member's peer certificate (the one made to be shown as a client)."""
        cfg = self.node.cfg
        addr = cfg.clients[peer_id]
        if not cfg.cert_file:
            return grpc.aio.insecure_channel(addr)
        from .tls import read_file

        ca = cfg.trusted_ca_file or cfg.peer_trusted_ca_file
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_file(ca) if ca else None,
            private_key=read_file(cfg.peer_key_file) if cfg.peer_key_file else None,
            certificate_chain=read_file(cfg.peer_cert_file) if cfg.peer_cert_file else None)
        return grpc.aio.secure_channel(addr, creds)

    async def _peer_hash(self, peer_id: int, index: int) -> HashMark:
        ch = self._channels.get(peer_id)
        if ch is None:
            ch = self._channels[peer_id] = self._channel(peer_id)
        stub = maintenance_pb2_grpc.MaintenanceStub(ch)
        r = await stub.HashKV(maintenance_pb2.HashKVRequest(index=index), timeout=HASH_TIMEOUT_S,
                              metadata=member_metadata(self.node))  # HashKV needs root with auth on
        return HashMark(r.index, r.revision, r.hash)

    async def check_once(self) -> list[int]:
        """Hash every member at one barrier; raise a CORRUPT alarm about each that differs. The corrupt."""
        node = self.node
        assert node.sm is not None  # started
        mark = await leader_hash(node)
        marks = {node.id: mark}
        peers = [i for i in node.member_ids if i != node.id]
        answers = await asyncio.gather(*(self._peer_hash(i, mark.index) for i in peers), return_exceptions=True)
        for peer_id, answer in zip(peers, answers, strict=True):
            if isinstance(answer, HashMark):
                marks[peer_id] = answer
            else:
                log.warning("corruption check: member %d gave no hash at index %d: %s", peer_id, mark.index,
                            answer.details() if isinstance(answer, grpc.RpcError) else answer)
        bad = differing(marks)
        self.checks += 1
        for member_id in bad:
            if (member_id, CORRUPT) in node.sm.alarms:
                continue
            log.error("CORRUPTION: member %d's state differs from the majority's at index %d (%s); "
                      "raising a CORRUPT alarm", member_id, mark.index,
                      ", ".join(f"member {i}: hash {m.hash:08x} revision {m.revision}"
                                for i, m in sorted(marks.items())))
            change = command_pb2.AlarmChange(member_id=member_id, alarm=CORRUPT, activate=True)
            await node.propose_internal(command_pb2.Command(alarm=change), HASH_TIMEOUT_S)
        return bad
