"""The member's watchers and how applied events reach them (etcd's watchable store).

After every applied batch the node calls `notify`: the hub reads the new
events from the history ONCE (one LMDB read, a bounded page at a time) and
hands each synced watcher the ones it wants. Apply never waits for a
watcher: `notify` runs on the event loop after the batch is committed, and
only appends to in-memory buffers.

A watcher whose buffer passes MAX_PENDING events (its client reads too
slowly) is dropped from the synced set and stops receiving; its stream then
catches it up from the history at its own pace (`catch_up`), a page at a
time, and it rejoins the synced set once it has read past what the hub has
delivered. The hub keeps the events it read recently (RECENT_BYTES), so the
many watchers one burst leaves behind catch up from memory, not each from
LMDB. A watcher created at an old revision starts that way too. If the
history it still needs has been compacted, it is cancelled with the
compacted revision (etcd's ErrCompacted).

Every watcher keeps `next_rev`, the first revision it has not been given:
the hub hands it only events at or after it, so a watcher that rejoins
gets nothing twice, and since it rejoins only past the hub's revision it
misses nothing. One revision's events are never split between deliveries.
"""
from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import Callable

from kvstore.storage import history, keys
from kvstore.storage.history import Event, RevisionError
from kvstore.storage.state_machine import StateMachine

__all__ = ["WatchHub", "Watcher", "RevisionError"]

MAX_PENDING = 10_000  # events buffered for one watcher before it is moved to catch up from history
PAGE = 1000  # events read from the history at once (the hub, and each catch-up)
RECENT_BYTES = 32 << 20  # the recent events the hub keeps in memory for catching up (about)


class Watcher:
    """One watch: what it selects, where it is, and its buffer of events not yet sent."""

    def __init__(self, watch_id: int, key: bytes, range_end: bytes, start: int, *, prev_kv: bool,
                 no_put: bool, no_delete: bool, progress_notify: bool, wake: Callable[[], None]) -> None:
        self.id = watch_id
        self.key, self.range_end = key, range_end
        self.end = keys.range_end_bound(key, range_end) if range_end else None
        self.prev_kv, self.no_put, self.no_delete = prev_kv, no_put, no_delete
        self.progress_notify = progress_notify
        self.next_rev = start  # the first revision not yet given to this watcher
        self.synced = False
        self.pending: deque[tuple[Event, Event | None]] = deque()
        self.wake = wake  # tells the watcher's stream there is work

    @property
    def selection(self) -> tuple:
        """What decides which events it gets, apart from where it is: watchers alike share a filter pass."""
        return (self.key, self.range_end, self.no_put, self.no_delete, self.prev_kv)

    def selects(self, key: bytes) -> bool:
        if not self.range_end:
            return key == self.key
        return key >= self.key and (self.end is None or key < self.end)

    def wants(self, ev: Event) -> bool:
        if ev.revision < self.next_rev:
            return False
        if ev.kind == history.PUT and self.no_put or ev.kind == history.DELETE and self.no_delete:
            return False
        return self.selects(ev.key)


class WatchHub:
    """Every watcher of this member; fed by `notify` after each applied batch."""

    def __init__(self) -> None:
        self.sm: StateMachine | None = None
        self.revision = 0  # every event up to here has been handed to the synced watchers
        self._synced: set[Watcher] = set()
        self._all: set[Watcher] = set()  # synced or catching up
        self._readable: asyncio.Event | None = None
        self.testing_max_pending = MAX_PENDING
        # The events of revisions recent_from..revision, as the hub read them: slow watchers of
        # one burst catch up from here together instead of each reading LMDB (see catch_up).
        self._recent: list[tuple[Event, Event | None]] = []
        self._recent_revs: list[int] = []
        self._recent_bytes = 0
        self._recent_from = 1
        self._recent_prev = False  # whether its entries carry prev records

    def attach(self, sm: StateMachine, readable: asyncio.Event) -> None:
        """Serve from `sm` (readable: cleared while a snapshot install swaps its environment)."""
        self.sm, self._readable = sm, readable
        self.revision = sm.revision
        self._forget_recent()

    @property
    def ready(self) -> bool:
        return self.sm is not None and self._readable is not None and self._readable.is_set()

    async def wait_ready(self) -> None:
        while not self.ready:
            if self._readable is None:
                await asyncio.sleep(0.05)
            else:
                await self._readable.wait()

    def add(self, w: Watcher) -> None:
        """Start a watcher: synced if it starts after what the hub has delivered, else it catches up."""
        self._all.add(w)
        if w.next_rev <= 0:
            w.next_rev = self.revision + 1
        if w.next_rev > self.revision:
            w.synced = True
            self._synced.add(w)
        w.wake()

    def remove(self, w: Watcher) -> None:
        self._synced.discard(w)
        self._all.discard(w)
        w.pending.clear()

    def notify(self) -> None:
        """Hand the events applied since the last call to the synced watchers (one read for all)."""
        sm = self.sm
        if sm is None or not self.ready:
            return  # the install's end notifies again
        while self.revision < sm.revision:
            if not self._all:
                self.revision = sm.revision
                self._forget_recent()
                return
            # Read (and remember) for the watchers catching up too: they will want these next.
            want_prev = any(w.prev_kv for w in self._all)
            try:
                events, read_at = sm.events(self.revision + 1, PAGE, want_prev)
            except RevisionError:  # a snapshot install jumped past compacted history
                for w in list(self._synced):
                    self._demote(w)
                self.revision = sm.revision
                self._forget_recent()
                return
            upto = events[-1][0].revision if len(events) >= PAGE else read_at
            self._remember(events, want_prev)
            first = events[0][0].revision if events else upto + 1
            # Watchers that select alike share one pass over the events (1,000 on one prefix: one).
            groups: dict[tuple, list[Watcher]] = {}
            for w in self._synced:
                groups.setdefault(w.selection, []).append(w)
            for members in groups.values():
                shared = None
                for w in members:
                    if w.next_rev <= first:  # wants every revision of the page
                        if shared is None:
                            shared = [(ev, prev if w.prev_kv else None) for ev, prev in events if w.wants(ev)]
                        got = shared
                    else:  # starts inside the page (a future start, or it just caught up)
                        got = [(ev, prev if w.prev_kv else None) for ev, prev in events if w.wants(ev)]
                    if got:
                        w.pending.extend(got)
                        w.wake()
                    w.next_rev = max(w.next_rev, upto + 1)
                    if len(w.pending) > self.testing_max_pending:
                        self._demote(w)
            self.revision = upto

    def _demote(self, w: Watcher) -> None:
        """A slow watcher: no more deliveries; its stream catches it up from the history."""
        self._synced.discard(w)
        w.synced = False
        w.wake()

    def _forget_recent(self) -> None:
        """The recent events no longer run up to the hub's revision: start again empty after it."""
        self._recent, self._recent_revs, self._recent_bytes = [], [], 0
        self._recent_from = self.revision + 1

    def _remember(self, events: list, with_prev: bool) -> None:
        """Keep a page the hub read (revisions revision+1..): whole revisions, about RECENT_BYTES."""
        if with_prev != self._recent_prev:
            self._forget_recent()
            self._recent_prev = with_prev
        self._recent.extend(events)
        self._recent_revs.extend(ev.revision for ev, _ in events)
        self._recent_bytes += sum(len(ev.record) + len(ev.key) + 64 for ev, _ in events)
        if self._recent_bytes > RECENT_BYTES:
            cut = len(self._recent) // 2
            revs = self._recent_revs
            while cut < len(revs) and revs[cut] == revs[cut - 1]:
                cut += 1  # never split a revision
            self._recent_bytes -= sum(len(ev.record) + len(ev.key) + 64 for ev, _ in self._recent[:cut])
            del self._recent[:cut], self._recent_revs[:cut]
            if revs:
                self._recent_from = revs[0]
            else:  # one revision filled it all: keep nothing (the hub's revision is then its last)
                self._recent_from = events[-1][0].revision + 1

    def catch_up(self, w: Watcher) -> None:
        """Give an unsynced watcher with an empty buffer its next page of history.

        From the hub's recent events when they reach back to it, else from LMDB.
        Raises RevisionError when what it needs has been compacted. Rejoins the
        synced set once it has read past the hub's revision.
        """
        assert self.sm is not None
        if self._recent_from <= w.next_rev <= self.revision + 1 and (self._recent_prev or not w.prev_kv):
            revs = self._recent_revs
            i = bisect.bisect_left(revs, w.next_rev)
            j = min(i + PAGE, len(revs))
            while 0 < j < len(revs) and revs[j] == revs[j - 1]:
                j += 1  # whole revisions
            w.pending.extend((ev, prev if w.prev_kv else None) for ev, prev in self._recent[i:j] if w.wants(ev))
            w.next_rev = revs[j] if j < len(revs) else self.revision + 1
            if w.next_rev > self.revision:
                w.synced = True
                self._synced.add(w)
            return
        events, read_at = self.sm.events(w.next_rev, PAGE, w.prev_kv)
        w.pending.extend((ev, prev) for ev, prev in events if w.wants(ev))
        if len(events) >= PAGE:
            w.next_rev = events[-1][0].revision + 1
        else:
            w.next_rev = read_at + 1
        if w.next_rev > self.revision:
            w.synced = True
            self._synced.add(w)

    @property
    def watcher_count(self) -> int:
        return len(self._synced)
