"""--quota-backend-bytes on a member: refuse writes that add data past it, raise and clear NOSPACE.

The leader admits every write, so it checks its own store's space in use
(storage/quota.py) before proposing one that adds data, and refuses it with
RESOURCE_EXHAUSTED naming the quota and the size in use. The first refusal
raises the NOSPACE alarm through the log: from then on every member's state
machine refuses such commands too (also those already in flight), the same
way on each. Reads, deletes and compactions go on. Once deletes and a
compaction have freed pages (LMDB reuses them: see quota.py) and the space
in use is back under the quota, the leader clears the alarm itself; no
operator step, no defrag. Every member runs with the same flag, and a new
leader takes over the checks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc

from kvstore.storage import alarms as alarm_set
from kvstore.storage import quota
from kvstore.v1 import command_pb2

from .errors import RequestFailed

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("kvstore.quota")

REFRESH_S = 0.02  # the space in use is measured at most this often (after applies)


class SpaceQuota:
    def __init__(self, node: Node, quota_bytes: int) -> None:
        self.node = node
        self.quota = quota_bytes or quota.DEFAULT_QUOTA_BYTES
        self.used = 0
        self.file_bytes = 0
        self.map_full = False
        self.over = False
        self._measured_at = 0.0
        self._changing: asyncio.Task | None = None

    def measure(self, force: bool = False) -> None:
        """Measure the space in use (after an apply; at most every REFRESH_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._measured_at < REFRESH_S:
            return
        self._measured_at = now
        sm = self.node.sm
        self.used = sm.used_bytes()
        self.file_bytes = sm.db_size()
        self.map_full = quota.map_nearly_full(self.file_bytes, sm.map_size)
        self.over = self.used >= self.quota or self.map_full

    def check(self, ops) -> None:
        """Raise RESOURCE_EXHAUSTED (nothing proposed) for ops that add data to a store past its quota."""
        if not self.over or not quota.adds_data(ops):
            return
        self.measure(force=True)
        if not self.over:
            return
        self._raise_alarm()
        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, self.refusal(), not_applied=True)

    def refusal(self) -> str:
        if self.map_full:
            return quota.map_exceeded(self.file_bytes, self.node.sm.map_size)
        return quota.space_exceeded(self.quota, self.used)

    def tick(self) -> None:
        """Leader only: clear NOSPACE once the space in use is back under the quota."""
        node = self.node
        if not node.is_leader or not alarm_set.has(node.sm.alarms, alarm_set.NOSPACE):
            return
        self.measure()
        if not self.over:
            self._change(False)

    def _raise_alarm(self) -> None:
        if not alarm_set.has(self.node.sm.alarms, alarm_set.NOSPACE):
            self._change(True)

    def _change(self, activate: bool) -> None:
        if self._changing is not None and not self._changing.done():
            return
        self._changing = asyncio.ensure_future(self._propose(activate))

    async def _propose(self, activate: bool) -> None:
        node = self.node
        change = command_pb2.AlarmChange(member_id=0 if not activate else node.id, alarm=alarm_set.NOSPACE,
                                         activate=activate)
        try:
            await node.propose_internal(command_pb2.Command(alarm=change), node.cfg.request_timeout_ms / 1000)
        except RequestFailed as e:
            log.warning("could not %s the NOSPACE alarm: %s", "raise" if activate else "clear", e.message)
            return
        if activate:
            log.warning("NOSPACE: %s", self.refusal())
        else:
            log.info("NOSPACE cleared: %d bytes in use of the %d-byte quota", self.used, self.quota)
