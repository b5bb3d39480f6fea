"""Committed entries on their way into the state machine, dispatched by type.

The Ready handler yields committed entries (APPLY steps); the driver hands
them to `submit`. Each apply then `take`s the whole backlog as one batch, so
under load batches grow and one LMDB transaction (its page writes and commit)
serves many entries. Per entry type:

  normal, with a command   applied by the state machine;
  normal, empty            the leader's no-op of a new term: only moves the
                           applied index (in the same transaction);
  conf change              moves the applied index the same way; then, in
                           order, the membership hook (`ConfChangeHook`) with
                           the ConfChange and the ConfState the core returns.

`run` is the state machine's transaction and may run on any thread: waiting
clients are answered once its results are computed, just before LMDB
commits (the entries are committed in Raft, i.e. durable on a majority, and
a crash before the LMDB commit replays them from the WAL to the same
results). `finish` runs on the driver's thread once the transaction has
committed: membership changes reach the core, the core learns the applied
index (`RawNode.advance_apply_to`), and the reads waiting for it are released.

No asyncio and no threads here: node.py decides where `run` executes (the
event loop for a small backlog, the apply thread otherwise); the simulator
runs it in place.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvstore.raft.confchange import decode_conf_change
from kvstore.raft.rawnode import RawNode
from kvstore.raft.types import ConfChange, ConfState, Entry, EntryType

# A backlog up to this size may be applied on the event loop when no apply is running: on the
# apply thread each py-lmdb call gives up the GIL and must win it back from the loop, and the hop
# there and back costs more than applying a few entries.
INLINE_APPLY_MAX_BYTES = 256 << 10
APPLY_BACKLOG_MAX_BYTES = 64 << 20  # committed but not yet applied, before the Ready loop waits


class StateMachineApply(Protocol):
    """What the pipeline needs of the state machine (storage/state_machine.py's StateMachine)."""

    @property
    def applied_index(self) -> int: ...

    @property
    def syncs_commits(self) -> bool: ...

    def apply(self, entries: list[tuple[int, int, bytes]], origins: list | None = None,
              before_commit: Callable[[list], None] | None = None) -> list: ...


class ApplyEvents(Protocol):
    def answer(self, last_index: int, origins: list, results: list) -> None:
        """Waiting clients get their results (the batch is committed in Raft, not yet in LMDB)."""

    def applied(self, index: int) -> None:
        """The state machine committed everything up to `index`: release what waits for it."""


class ConfChangeHook(Protocol):
    def on_conf_change(self, index: int, cc: ConfChange, conf_state: ConfState) -> None:
        """A membership change was applied at `index`; `conf_state` is the membership after it."""


class RecordConfState:
    """The membership hook of a server whose members are fixed at start: it only records the ConfState."""

    def __init__(self, conf_state: ConfState) -> None:
        self.conf_state = conf_state
        self.index = 0

    def on_conf_change(self, index: int, cc: ConfChange, conf_state: ConfState) -> None:
        self.index, self.conf_state = index, conf_state


class ApplyBatch:
    """One state machine transaction: the entries, what the state machine gets, the conf changes."""

    __slots__ = ("entries", "items", "conf_changes", "origins")

    def __init__(self, entries: list[Entry], items: list[tuple[int, int, bytes]],
                 conf_changes: list[Entry], origins: list | None) -> None:
        self.entries = entries
        self.items = items
        self.conf_changes = conf_changes
        self.origins = origins  # filled by the state machine when someone here waits for these

    @property
    def last_index(self) -> int:
        return self.entries[-1].index


class ApplyPipeline:
    def __init__(self, raw: RawNode, state_machine: StateMachineApply, events: ApplyEvents,
                 conf_changes: ConfChangeHook, waiting: Callable[[], bool]) -> None:
        """`waiting()`: whether anyone on this member waits for an answer (else no origins are kept)."""
        self.raw = raw
        self.sm = state_machine
        self.events = events
        self.conf_changes = conf_changes
        self.waiting = waiting
        self.backlog: list[Entry] = []
        self.backlog_bytes = 0

    def submit(self, entries: list[Entry]) -> None:
        """Committed entries, in order, after those already submitted."""
        self.backlog.extend(entries)
        size = 0
        for e in entries:
            size += len(e.data)
        self.backlog_bytes += size

    def may_apply_inline(self) -> bool:
        """Whether the backlog is small enough to apply on the driver's own thread right now (and
        LMDB does not fdatasync each commit, which would stall it)."""
        return self.backlog_bytes <= INLINE_APPLY_MAX_BYTES and not self.sm.syncs_commits

    def over_bound(self) -> bool:
        """Whether the driver must wait for the applies running before it takes the next Ready."""
        return self.backlog_bytes > APPLY_BACKLOG_MAX_BYTES

    def take(self) -> ApplyBatch:
        """Empty the backlog into one batch, each entry dispatched by its type."""
        entries, self.backlog, self.backlog_bytes = self.backlog, [], 0
        items: list[tuple[int, int, bytes]] = []
        conf: list[Entry] = []
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                conf.append(e)
                items.append((e.index, e.term, b""))  # the state machine only moves its applied index
            else:
                items.append((e.index, e.term, e.data))  # empty data: the no-op of a new term
        return ApplyBatch(entries, items, conf, [] if self.waiting() else None)

    def run(self, batch: ApplyBatch, answer: Callable[[int, list, list], None] | None = None) -> list:
        """The state machine transaction (any thread); waiters are answered just before it commits."""
        reply = answer or self.events.answer
        before_commit = None
        if batch.origins is not None:
            origins, last = batch.origins, batch.last_index

            def before_commit(results: list) -> None:
                reply(last, origins, results)

        return self.sm.apply(batch.items, batch.origins, before_commit)

    def finish(self, batch: ApplyBatch) -> None:
        """On the driver's thread, once `run` returned: the core and the readers learn what is applied."""
        for e in batch.conf_changes:
            cc = decode_conf_change(e.data)
            self.conf_changes.on_conf_change(e.index, cc, self.raw.apply_conf_change(cc))
        self.raw.advance_apply_to(batch.last_index)
        self.events.applied(self.sm.applied_index)
