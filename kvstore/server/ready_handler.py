"""The decisions of the Ready loop, in one synchronous component.

For each `Ready` of the Raft core, `ReadyHandler.handle` yields the steps a
driver must carry out, in order (etcd's Ready loop):

1. SEND the `messages` that may leave now: the leader's AppendEntries go out
   before its own fsync, so replication overlaps local persistence;
2. APPLY the committed entries that an earlier write made durable here (the
   leader's usual case): they need not wait for this Ready's fsync;
3. INSTALL a received snapshot (state machine first, then the log reset, then
   the image's removal: `install_snapshot`);
4. PERSIST the new entries and hard state, one write and one fdatasync
   (`persist`); a hard state that only moves the commit index rides along
   with the next write instead of costing an fsync of its own;
5. SEND the `persisted_messages` (votes, acks), which promise what step 4
   made durable;
6. APPLY the committed entries that were among this Ready's own entries:
   applying them before step 4 could leave the state machine ahead of the log.

Then the handler advances the core. It also tells the node's `ReadyEvents`
what changed (term, leader, confirmed reads) before any step runs.

No asyncio and no threads here: the server's asyncio shell (node.py) runs
PERSIST and INSTALL on its storage thread and APPLY through the
`ApplyPipeline` (apply_pipeline.py); the simulator (tests/sim/) runs the same
steps on fake storage that loses what was not fsynced, and may stop between
any two of them. Storage and the clock are injected as the small interfaces
below, so both drive the same code.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from kvstore.raft import faults
from kvstore.raft.rawnode import RawNode
from kvstore.raft.ready import Ready
from kvstore.raft.types import Entry, HardState, SnapshotMetadata, StateRole

from .logs import event

log = logging.getLogger("kvstore.node")

SLOW_FSYNC_S = 1.0  # a WAL write + fdatasync slower than this is logged (etcd's "slow fdatasync")


class LogWriter(Protocol):
    """The write side of the Raft log (storage/raft_log.py's RaftLog)."""

    def append(self, entries: list[Entry], hard_state: HardState | None = None) -> None:
        """Entries (cutting a conflicting suffix) and the hard state: one write, one fdatasync."""

    def apply_snapshot(self, meta: SnapshotMetadata) -> None:
        """Discard the log; continue after meta.index."""


class SnapshotInstaller(Protocol):
    """The state machine's side of an install (storage/state_machine.py's StateMachine)."""

    def install_snapshot(self, path: str) -> None:
        """Replace the whole state by the image at `path`, atomically and durably."""


class SnapshotFiles(Protocol):
    """Received images (storage/snapshot.py's SnapshotStore)."""

    def list(self) -> list[tuple[int, int, list[int], str]]:
        """(index, term, voters, path) of each image, oldest first."""

    def remove_through(self, index: int) -> None:
        """Drop the images at `index` and before."""


class ReadyEvents(Protocol):
    """What the node learns from a Ready besides the steps (leader, term, reads)."""

    def on_hard_state(self, hs: HardState) -> None: ...

    def on_soft_state(self, leader_id: int, role: StateRole) -> None: ...

    def on_read_state(self, index: int, ctx: bytes) -> None: ...

    def on_fsync(self, took_s: float, entries: int) -> None:
        """A WAL write finished (metrics)."""


class Step(enum.Enum):
    SEND = "send"  # payload: list[Message]
    APPLY = "apply"  # payload: list[Entry], committed, in order
    INSTALL = "install"  # payload: SnapshotMetadata; the driver calls install_snapshot(meta)
    PERSIST = "persist"  # payload: Write; the driver calls persist(write)


class Write:
    """What one PERSIST step writes: entries and maybe a hard state, in one fdatasync."""

    __slots__ = ("entries", "hard_state")

    def __init__(self, entries: list[Entry], hard_state: HardState | None) -> None:
        self.entries = entries
        self.hard_state = hard_state


class ReadyHandler:
    def __init__(self, raw: RawNode, wal: LogWriter, state_machine: SnapshotInstaller, snapshots: SnapshotFiles,
                 events: ReadyEvents, clock: Callable[[], float], bugs: frozenset[str] = frozenset()) -> None:
        self.raw = raw
        self.wal = wal
        self.state_machine = state_machine
        self.snapshots = snapshots
        self.events = events
        self.clock = clock
        self.bugs = faults.check(bugs)
        self._apply_before_durable = faults.APPLY_BEFORE_DURABLE in bugs
        self._ack_before_fsync = faults.ACK_BEFORE_FSYNC in bugs
        self._fsync_error_not_fatal = faults.FSYNC_ERROR_NOT_FATAL in bugs
        self.unsynced_hard_state: HardState | None = None  # a commit-only hard state not yet written
        self.append_since = 0.0  # clock() when the WAL write under way began; 0: none (see health.py)

    def handle(self, rd: Ready) -> Iterator[tuple[Step, object]]:
        """The steps for `rd`, in order; the core is advanced once the last one is done.

        A driver that stops early (a crash) must throw the handler away with
        its RawNode: the Ready is then simply lost, as it would be on disk.
        """
        ev = self.events
        if rd.hard_state is not None:  # the term first: a leader change is logged with its term
            ev.on_hard_state(rd.hard_state)
        if rd.soft_state is not None:
            ev.on_soft_state(rd.soft_state.leader_id, rd.soft_state.role)
        for rs in rd.read_states:
            ev.on_read_state(rs.index, rs.ctx)

        if rd.messages:
            yield Step.SEND, rd.messages
        if self._ack_before_fsync and rd.persisted_messages:
            yield Step.SEND, rd.persisted_messages  # TESTING: promises what is not durable yet

        late: list[Entry] = rd.committed_entries
        if late and (rd.committed_are_durable() or self._apply_before_durable):
            yield Step.APPLY, late
            late = []

        if rd.snapshot is not None and not rd.snapshot.is_empty():
            yield Step.INSTALL, rd.snapshot.metadata

        write = self._write_for(rd)
        if write is not None:
            yield Step.PERSIST, write

        if rd.persisted_messages and not self._ack_before_fsync:
            yield Step.SEND, rd.persisted_messages

        if late:
            yield Step.APPLY, late

        self.raw.advance(rd)

    def _write_for(self, rd: Ready) -> Write | None:
        """What this Ready must write, or None.

        A hard state whose only change is the commit index needs no fsync of
        its own (raft relearns the commit index from the leader, and restarts
        from at least the state machine's durable applied index): it waits and
        rides along with the next write of entries or term/vote.
        """
        if rd.hard_state is not None:
            self.unsynced_hard_state = rd.hard_state
        if not (rd.entries or rd.must_sync):
            return None
        hs, self.unsynced_hard_state = self.unsynced_hard_state, None
        return Write(rd.entries, hs)

    # ------------------------------------------------------------------ storage steps (any thread)

    def persist(self, write: Write) -> None:
        """The PERSIST step: one WAL write and fdatasync. A failure ends the member (fail-stop)."""
        self.append_since = t0 = self.clock()
        try:
            self.wal.append(write.entries, write.hard_state)
        except OSError as e:
            if not self._fsync_error_not_fatal:
                raise
            log.error("TESTING: WAL write failed, carrying on as if it were durable: %s", e)
        self.append_since = 0.0
        took = self.clock() - t0
        self.events.on_fsync(took, len(write.entries))
        if took > SLOW_FSYNC_S:
            log.warning("slow fdatasync: the WAL write of %d entries took %.3fs (expected under %.0fs)",
                        len(write.entries), took, SLOW_FSYNC_S,
                        extra=event("slow-fdatasync", took_s=round(took, 3), expected_s=SLOW_FSYNC_S))

    def install_snapshot(self, meta: SnapshotMetadata) -> None:
        """The INSTALL step. Each step is durable before the next, and a crash between any two is
        finished on restart by storage/reconcile.py: the state machine first (it then is at the
        snapshot while the log is not), then the log reset to it, then the image dropped (it is the
        live state machine file now). Earlier applies must be done (the driver drains them)."""
        log.info("installing snapshot at index %d term %d", meta.index, meta.term,
                 extra=event("snapshot-install", index=meta.index, snapshot_term=meta.term))
        self.state_machine.install_snapshot(self._image_path(meta.index))
        self.wal.apply_snapshot(meta)
        self.snapshots.remove_through(meta.index)

    def _image_path(self, index: int) -> str:
        for i, _term, _voters, path in self.snapshots.list():
            if i == index:
                return path
        raise FileNotFoundError(f"snapshot {index} was announced but is not among the received images")

    def flush_hard_state(self) -> None:
        """On a clean stop: write a commit-only hard state still held back (see _write_for)."""
        hs, self.unsynced_hard_state = self.unsynced_hard_state, None
        if hs is not None:
            self.wal.append([], hs)

