"""Automatic history compaction (etcd's --auto-compaction-mode / --auto-compaction-retention).

periodic: keep `retention` of time. Every member samples its revision every
tenth of the retention (at most hourly); the leader compacts to the newest
sample at least `retention` old. Samples are taken on every member, so a new
leader goes on where the old one stopped.
revision: keep `retention` revisions. Every `interval` (etcd: 5 minutes) the
leader compacts to revision - retention, if that is past the last compaction.

The compaction is proposed like any other (Command.compaction), so every
member compacts at the same point of the log.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from kvstore.storage.errors import ApplyError
from kvstore.v1 import command_pb2, kv_pb2

from .config import parse_duration
from .errors import RequestFailed

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("kvstore.compaction")

MODES = ("periodic", "revision")


def periodic_retention_s(text: str) -> float:
    """A duration; a bare number counts hours (etcd's rule for periodic mode)."""
    t = str(text).strip()
    if t.replace(".", "", 1).isdigit():
        return float(t) * 3600
    return parse_duration(t)


def check_auto_compaction(mode: str, retention: str, interval: str) -> None:
    """Raise ValueError naming the flag whose value is wrong."""
    if mode not in MODES:
        raise ValueError(f"--auto-compaction-mode must be one of {', '.join(MODES)}, not {mode!r}")
    try:
        if mode == "periodic":
            periodic_retention_s(retention)
        elif not str(retention).strip().isdigit():
            raise ValueError(f"{retention!r} is not a revision count")
    except ValueError as e:
        raise ValueError(f"--auto-compaction-retention: {e}") from None
    try:
        if parse_duration(interval) <= 0:
            raise ValueError("must be > 0")
    except ValueError as e:
        raise ValueError(f"--auto-compaction-interval: {e}") from None


class AutoCompactor:
    def __init__(self, node: Node, mode: str, retention: str, interval: str) -> None:
        self.node = node
        self.mode = mode
        if mode == "periodic":
            self.retention = periodic_retention_s(retention)
            self.period = min(self.retention / 10, 3600.0)
        else:
            self.retention = float(int(retention))
            self.period = parse_duration(interval)
        self._samples: deque[tuple[float, int]] = deque()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.retention > 0:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            self._samples.append((now, self.node.sm.revision))
            target = self._target(now)
            if target > self.node.sm.compact_revision and self.node.is_leader:
                await self._compact(target)
            await asyncio.sleep(self.period)

    def _target(self, now: float) -> int:
        """The revision to compact to now (0: nothing to do)."""
        if self.mode == "revision":
            return int(self.node.sm.revision - self.retention)
        target = 0
        while self._samples and now - self._samples[0][0] >= self.retention - 1e-6:
            target = self._samples.popleft()[1]
        if target:  # the newest old-enough sample stays as the base of the next round
            self._samples.appendleft((now - self.retention, target))
        return target

    async def _compact(self, revision: int) -> None:
        cmd = command_pb2.Command(compaction=kv_pb2.CompactionRequest(revision=revision))
        try:
            result = await self.node.propose_internal(cmd, self.node.cfg.request_timeout_ms / 1000)
        except RequestFailed as e:
            log.warning("auto-compaction to revision %d failed: %s", revision, e.message)
            return
        if isinstance(result, ApplyError):
            log.info("auto-compaction to revision %d refused: %s", revision, result.message)
        else:
            log.info("auto-compacted history to revision %d", revision)
