"""The node: drives the Raft core with ticks and messages, and runs the Ready loop.

Follow a write from the client to the fsync and back:

1. `kv_service` validates the request and calls `Node.propose`, which wraps
   the ops in a `Command` (with a fresh proposal id), registers a waiter in
   `Proposals`, queues the bytes and wakes the loop. Before each `Ready` the
   loop hands everything queued since the last one to `RawNode.propose_batch`:
   N concurrent puts become N entries in one log append and one AppendEntries
   per follower, not N of each.
2. `_ready_loop` takes a `Ready` and runs the steps `ReadyHandler.handle`
   yields for it (ready_handler.py decides them: what is sent before and
   after the fsync, what is written, which committed entries are applied
   before this Ready's write and which after it). This file only does the
   I/O: messages go to the transport; the WAL write runs on the storage
   thread for the leader (its loop keeps taking requests and acks meanwhile:
   the group commit) and on the loop for a follower; a snapshot install runs
   on the storage thread once earlier applies are done; committed entries go
   to the `ApplyPipeline` (apply_pipeline.py), applied at once on the loop
   when the backlog is small (up to 256 KiB, LMDB commits not fdatasynced),
   else on the apply thread without waiting for it, each apply taking
   everything committed meanwhile. After each Ready, 10 ms after the last
   one ended, a checkpoint starts in the background (`_maybe_snapshot`):
   LMDB synced as the durable base; every `--snapshot-count` entries the log
   is then compacted behind it. Nothing waits for it.
3. Once the apply transaction has computed the results (the entries are
   durable on a majority by then), each goes to its waiting client while
   LMDB commits, and `kv_service` answers (see `_submit_backlog`). Once it
   has committed, the core learns the applied index and the reads waiting
   for it are released (`ApplyPipeline.finish`, then `applied`).

Everything that touches the RawNode runs on the event loop thread; the
blocking calls go to two threads: the storage thread (the leader's WAL
fsync, snapshot install) and the apply thread (LMDB transactions too big for
the loop, or fdatasynced ones), each one call at a time. Checkpoints (the
LMDB sync) and the images streamed to followers run on threads of their own.

Fail-stop: any exception in the loops, the tasks, those threads, a snapshot
sent or received, or the Raft core goes to `supervisor.fatal`, which logs one
line naming the operation and the file and ends the process (see
supervisor.py). Nothing here catches a storage error to carry on.
"""
from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, cast

import grpc

from kvstore import __version__
from kvstore.raft import ConfChange, ConfChangeRefused, Config, ProposalDropped, RawNode
from kvstore.raft.types import Message, SnapshotMetadata, StateRole
from kvstore.storage import boot_guard, quota
from kvstore.storage.raft_log import RaftLog
from kvstore.storage.reconcile import ReconcileError, reconcile
from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.members import MemberSet
from kvstore.storage.state_machine import StateMachine, StateMachineClosed
from kvstore.storage.wal import WalCorruptionError
from kvstore.storage.wal_repair import repair_hint
from kvstore.v1 import command_pb2, kv_pb2

from .config import ServerConfig
from .corruption import check_not_corrupt
from .errors import (
    RequestFailed, leadership_lost, not_applied, shutting_down, stopped_while_pending,
)
from .lessor import Lessor
from .logs import event
from .metrics import SLOW_APPLY_S, NodeMetrics
from .proposals import Proposals
from .apply_pipeline import ApplyBatch, ApplyPipeline, RecordConfState
from .read_index import ReadIndex
from .ready_handler import ReadyHandler, Step, Write
from .space_quota import SpaceQuota
from .watch_hub import WatchHub
from .redirect import no_leader, not_leader
from .supervisor import SupervisedReader, fatal, guarded, on_fatal, watch
from .tls import PeerTLS
from .transport import ImageReader, Transport

log = logging.getLogger("kvstore.node")

# A checkpoint is also due once the WAL holds this many segments (times a jitter of 1 to 1.5, drawn
# anew after each checkpoint): coalesced entries carry many puts each, so --snapshot-count entries
# may be GiBs of log.
CHECKPOINT_WAL_SEGMENTS = 4
# Between those, the durable base alone moves on: a base sync (StateMachine.checkpoint, the log
# untouched) starts --backend-batch-interval (10 ms) after the last one ended, once anything was
# applied since. A page rewritten after the base is reused only once the next base is saved (the
# base is pinned, see durable_base.py), so the file grows by every page written in between: ~4 KiB
# per random put, 100+ MiB/s under load. Syncing nearly back to back keeps that to a fraction of a
# second of writes (etcd's backend likewise commits and fsyncs every 100 ms); the syncs write
# nothing that the page cache would not write anyway, since no page of that window is reused
# before it. Measured (3 members, 6-7k puts/s, 2 shared cores): syncs of 48-95 ms (p50) and a
# file 1.15-1.47x its data with a 10 ms pause; 165-200 ms and 1.4-1.9x with 100 ms.

ROLE_NAMES = {
    StateRole.LEADER: "leader",
    StateRole.FOLLOWER: "follower",
    StateRole.CANDIDATE: "candidate",
    StateRole.PRE_CANDIDATE: "pre-candidate",
}


def _read_deadline() -> RequestFailed:
    return RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "read not confirmed before the deadline", not_applied=True)


class MemberRemoved(Exception):
    """This data dir belongs to a member that was removed from its cluster."""


def next_checkpoint_at(last: int, count: int, member_ids: list[int], member_id: int) -> int:
    """The applied index at which a member whose last checkpoint is at `last` checkpoints next.

    Every `count` entries, at a phase of its own: member k of n (in id order)
    at j * count + k * count // n, so members never sync and compact together.
    """
    rank = sorted(member_ids).index(member_id) if member_id in member_ids else 0
    phase = count * rank // max(len(member_ids), 1)
    return ((last - phase) // count + 1) * count + phase


class Node:
    def __init__(self, cfg: ServerConfig, peer_tls: PeerTLS | None = None,
                 join_members: MemberSet | None = None) -> None:
        """join_members: the member set an existing cluster reported (--initial-cluster-state existing)."""
        self.cfg = cfg
        self._own_peers = dict(cfg.peers)  # the peer addresses this member was started with (see MemberSet.peer_addrs)
        self._join_members = join_members
        self._members: MemberSet | None = None  # the member set in force (the state machine's, see members.py)
        self._stopping_removed = False
        self.peer_tls = peer_tls  # mutual TLS on both ends of peer connections, when configured
        self.id = cfg.id
        self.member_ids = cfg.member_ids
        self.storage_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage")
        self.apply_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self._applying: asyncio.Future | None = None  # applies the backlog, one batch at a time (see _start_apply)
        self._answered_index = 0  # the last entry whose waiters were answered (maybe not yet in LMDB)
        self._lmdb_waiters: list = []  # heap of (index, tiebreak, future): reads waiting for an LMDB commit
        # made by start(); close() also runs after a start that failed part way, so it checks for each
        self.log: RaftLog
        self.sm: StateMachine
        self.snapshots: SnapshotStore
        self.raw: RawNode
        self.handler: ReadyHandler  # the Ready loop's decisions (ready_handler.py)
        self.pipeline: ApplyPipeline  # committed entries into the state machine (apply_pipeline.py)
        self.transport: Transport
        self.proposals = Proposals(cfg.id)
        self.lessor = Lessor(lambda: self.is_leader, lambda: self.term, lambda: self.sm.leases, self.propose_internal,
                             testing_deadlines_from_apply=cfg.testing_lease_deadlines_from_apply)
        election_s = cfg.tick_ms * cfg.election_ticks / 1000
        self.read_index = ReadIndex(self._request_read_index, timeout_s=2 * election_s, timeout_error=self._read_timeout,
                                    deadline_error=_read_deadline)
        # what the services read without touching the core
        self.leader_id = 0
        self.role = StateRole.FOLLOWER
        self.term = 0
        self.commit_index = 0
        self.snapshot_index = 0
        self.draining = False  # shutting down: refuse new requests
        self._wake = asyncio.Event()
        self._leader_changed = asyncio.Event()
        self._sm_readable = asyncio.Event()
        self._sm_readable.set()
        self._tasks: list[asyncio.Task] = []
        self._stopped = False
        self._in_ready = False
        self._queued: list[tuple[int, bytes]] = []  # (proposal id, Command bytes) for the next batch
        self._checkpointing: asyncio.Task | None = None  # the background checkpoint (see _maybe_snapshot)
        self._wal_checkpoint_bytes = self._draw_wal_checkpoint_bytes()
        self._base_index = 0  # the applied index of the newest durable base (see _checkpoint)
        self._next_base_sync_at = 0.0  # time.monotonic() after which the next base sync may start
        self.metrics = NodeMetrics()  # event counts and timings for /metrics (metrics.py)
        self.peer_received_bytes: dict[int, int] = {}  # counted by the peer server
        self.watch_hub = WatchHub()  # fed after every applied batch (watch_hub.py)
        self.space_quota = SpaceQuota(self, cfg.quota_backend_bytes)

    @property
    def wal_append_since(self) -> float:
        """time.monotonic() when the WAL append under way began; 0: none (health.py)."""
        return self.handler.append_since if hasattr(self, "handler") else 0.0

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Open storage, repair it, start the core and the loops; a failure is one FATAL line, not a traceback."""
        try:
            await self._open_and_start()
        except Exception as e:  # storage that cannot be opened or does not add up
            fatal(f"starting member {self.id} on {self.cfg.data_dir}", e)

    async def _open_and_start(self) -> None:
        d = self.cfg.data_dir
        os.makedirs(d, exist_ok=True)
        # A fatal error from here on means LMDB may hold what never reached the disk: the next start
        # must not trust it, even in this boot (see boot_guard.condemn).
        on_fatal(functools.partial(boot_guard.condemn, os.path.join(d, "db")))
        # LMDB commits without fdatasync by default (--state-machine-sync boot): the WAL is the
        # durable record; a process crash loses nothing (the page cache survives it), and after an OS
        # crash, which may tear an unsynced LMDB file, the boot guard discards the state machine and
        # _reconcile_storage rebuilds it from the newest snapshot and the WAL. The fdatasync per
        # applied batch ('commit') cost ~20% of a write's CPU on every member.
        by_boot = self.cfg.state_machine_sync == "boot"  # see StateMachine.open and boot_guard.py
        self.sm = await self._in_storage(
            functools.partial(StateMachine.open, os.path.join(d, "db"), quota.map_size_for(self.cfg.quota_backend_bytes),
                              fsync=not by_boot, boot_guard=by_boot,
                              session_ttl_ms=self.cfg.session_ttl_ms, max_sessions=self.cfg.max_sessions))
        self.sm.testing_log_time_from_absolute_stamps = self.cfg.testing_wall_clock_sessions
        # The state machine first: the entries it has applied are checksummed when read, not at open.
        self.log = await self._in_storage(self._open_log, self.sm.applied_index)
        self.snapshots = SnapshotStore(os.path.join(d, "snap"))
        if self.cfg.testing_corrupt_state:
            log.warning("TESTING: corrupting this member's state (--testing-corrupt-state)")
            await self._in_storage(self.sm.testing_corrupt)
        await self._reconcile_storage()
        members = await self._in_storage(self._initial_members)
        self._adopt_members(members)
        self.watch_hub.attach(self.sm, self._sm_readable)
        self.space_quota.measure(force=True)
        snap = self.log.snapshot()
        self.snapshot_index = snap.metadata.index
        raft_cfg = Config(
            id=self.id,
            peers=self.member_ids,
            election_tick=self.cfg.election_ticks,
            heartbeat_tick=self.cfg.heartbeat_ticks,
            applied=self.sm.applied_index,
            conf_state=members.conf_state(),
            max_learner_lag=self.cfg.max_learner_lag,
        )
        self.raw = RawNode(raft_cfg, self.log)
        self.pipeline = ApplyPipeline(self.raw, self.sm, self, RecordConfState(self.raw.conf_state()),
                                      waiting=lambda: len(self.proposals) > 0)
        self.handler = ReadyHandler(self.raw, self.log, self.sm, self.snapshots, self, time.monotonic)
        st = self.raw.status()
        self.term, self.commit_index = st.term, st.commit
        self.read_index.on_applied(self.sm.applied_index)
        log.info(
            "member %d starting: term %d, commit %d, applied %d, snapshot %d, members %s",
            self.id, self.term, self.commit_index, self.sm.applied_index, self.snapshot_index, self.member_ids,
        )
        self.transport = Transport(
            self.id,
            self.cfg.cluster_id,
            dict(self.cfg.peers),
            report_unreachable=self._report_unreachable,
            report_snapshot=self._report_snapshot,
            open_snapshot=self._open_image,
            tls=self.peer_tls,
        )
        self.transport.start()
        self._tasks = [
            watch(asyncio.create_task(self._tick_loop(), name="tick"), "the tick loop"),
            watch(asyncio.create_task(self._ready_loop(), name="ready"), "the Ready loop"),
        ]

    def _initial_members(self) -> MemberSet:
        """The member set to start with: the state machine's, else the flags' (or what the cluster
        reported, when joining); --force-new-cluster makes this member the only one."""
        sm = self.sm
        members = sm.members
        if members is None:
            members = self._join_members or MemberSet.initial(self.cfg.peers, self.cfg.clients,
                                                              {self.id: self.cfg.name or f"node{self.id}"})
            members = sm.set_members(members)
        if self.id in members.removed:
            raise MemberRemoved(f"member {self.id} was removed from the cluster; it may rejoin only with a fresh "
                                f"data dir after `kvstore member add`")
        if self.cfg.force_new_cluster:
            me = members.info.get(self.id) or MemberSet.initial(self.cfg.peers, self.cfg.clients).info[self.id]
            others = tuple(sorted(set(members.removed) | set(i for i in members.ids if i != self.id)))
            members = sm.set_members(MemberSet((self.id,), (), {self.id: me}, others), only_if_unset=False)
            log.warning("--force-new-cluster: member %d is now the only member (was %s); add the others back "
                        "with `kvstore member add`", self.id, others, extra=event("force-new-cluster"))
        return members

    def _adopt_members(self, members: MemberSet) -> None:
        """Take a member set into force: ids, addresses for redirects and the transport."""
        self._members = members
        self.member_ids = members.ids
        for addrs, new in ((self.cfg.peers, members.peer_addrs(self._own_peers)),
                           (self.cfg.clients, members.client_addrs())):
            addrs.clear()
            addrs.update(new)
        if hasattr(self, "transport"):
            self.transport.set_peers(dict(self.cfg.peers))

    def _sync_members(self) -> None:
        """After an apply or an install: follow a changed member set; a removed member stops."""
        members = self.sm.members
        if members is None or members is self._members:
            return
        old = self._members
        self._adopt_members(members)
        log.info("members now %s (learners %s)", list(members.voters), list(members.learners),
                 extra=event("members-changed", voters=list(members.voters), learners=list(members.learners)))
        if old is not None and self.id not in members.ids:
            self._stop_removed()

    def _stop_removed(self) -> None:
        """A member that was removed stops, once it no longer leads (a removed leader hands over first)."""
        if self._stopping_removed or self.role == StateRole.LEADER:
            return
        self._stopping_removed = True
        log.warning("member %d was removed from the cluster; stopping", self.id, extra=event("member-removed"))
        os.kill(os.getpid(), signal.SIGTERM)

    def was_removed(self, member_id: int) -> bool:
        """Whether `member_id` was a member once and was removed (its messages are refused)."""
        m = self._members
        return m is not None and member_id in m.removed

    @property
    def members(self) -> MemberSet:
        """The member set in force (before start: the flags')."""
        if self._members is None:
            return MemberSet.initial(self.cfg.peers, self.cfg.clients)
        return self._members

    async def _reconcile_storage(self) -> None:
        """Bring the log and the state machine together after a crash (see storage/reconcile.py)."""
        try:
            await self._in_storage(reconcile, self.sm, self.log, self.snapshots)
        except ReconcileError as e:
            fatal(f"reconciling {self.cfg.data_dir}: {e}")

    async def shutdown(self, transfer_timeout: float = 3.0, drain_timeout: float = 2.0) -> None:
        """Hand over leadership, let in-flight writes finish, stop the loops."""
        self.draining = True
        if self.is_leader and len(self.member_ids) > 1:
            deadline = time.monotonic() + drain_timeout
            while len(self.proposals) and time.monotonic() < deadline:  # noqa: ASYNC110 (no event for "drained")
                await asyncio.sleep(0.01)
            target = self.most_up_to_date_follower()
            if target:
                log.info("shutting down as leader: transferring leadership to member %d", target)
                try:
                    await self.transfer_leadership(target, transfer_timeout)
                except RequestFailed as e:
                    log.warning("leadership transfer before shutdown failed: %s", e.message)

    async def close(self) -> None:
        self._stopped = True
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        for t, outcome in zip(self._tasks, await asyncio.gather(*self._tasks, return_exceptions=True)):
            if isinstance(outcome, Exception) and not isinstance(outcome, asyncio.CancelledError):
                fatal(f"the {t.get_name()} loop", outcome)  # never sync or clear the boot guard after it
        self.proposals.fail_all(stopped_while_pending())  # proposed entries may still commit
        self.read_index.fail_all(shutting_down())
        if hasattr(self, "transport"):
            await self.transport.stop()
        await self._drain_apply()
        if hasattr(self, "handler"):
            await self._in_storage(self.handler.flush_hard_state)
        if hasattr(self, "sm"):
            await self._in_storage(self.sm.close)
        if hasattr(self, "log"):
            await self._in_storage(self.log.close)
        self.storage_thread.shutdown(wait=True)
        self.apply_thread.shutdown(wait=True)
        log.info("member %d stopped", self.id)

    # ------------------------------------------------------------------ the loops

    async def _tick_loop(self) -> None:
        period = self.cfg.tick_ms / 1000
        next_at = time.monotonic()
        while True:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                self.raw.tick()
                self.read_index.check_timeouts()
                if self.sm.compacting and self._applying is None and self._sm_readable.is_set():
                    self.sm.compact_pending()  # no writes to carry the compaction's steps
                if self._sm_readable.is_set():
                    self.space_quota.tick()
                self.lessor.on_tick()  # the leader's lease expiry (lessor.py)
            except Exception as e:
                fatal("the tick loop", e)
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def _ready_loop(self) -> None:
        try:
            await self._run_ready_loop()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # advance, snapshot, read hooks: never continue on state we cannot trust
            fatal("the Ready loop", e)

    async def _run_ready_loop(self) -> None:
        while not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            self._propose_queued()
            while self.raw.has_ready() and not self._stopped:
                rd = self.raw.ready()
                t0 = time.monotonic()
                try:
                    await self._run_steps(rd)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("ready: %d entries, %d committed, %d+%d messages, %.1f ms",
                                  len(rd.entries), len(rd.committed_entries), len(rd.messages),
                                  len(rd.persisted_messages), (time.monotonic() - t0) * 1000)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a storage failure: never continue on a log we cannot trust
                    fatal("the Ready loop", e)
                self.read_index.on_applied(self.sm.applied_index)
                await self._maybe_snapshot()
                self._propose_queued()

    async def _run_steps(self, rd) -> None:
        """Carry out the handler's steps for `rd` (it advances the core after the last one)."""
        for step, payload in self.handler.handle(rd):
            if step is Step.SEND:
                self.transport.send(cast(list, payload))
            elif step is Step.APPLY:
                await self._start_apply(cast(list, payload))
            elif step is Step.PERSIST:
                await self._persist(cast(Write, payload))
            else:
                await self._install_snapshot(cast(SnapshotMetadata, payload))

    def _propose_queued(self) -> None:
        """Hand every proposal queued while the loop was busy to raft as one batch."""
        if not self._queued:
            return
        batch, self._queued = self._queued, []
        try:
            self.raw.propose_batch([data for _pid, data in batch])
        except ProposalDropped as e:
            err = self.redirect() if not self.is_leader else \
                not_applied(grpc.StatusCode.UNAVAILABLE, f"proposal dropped: {e}")
            for pid, _data in batch:
                self.proposals.fail(pid, err)

    async def _persist(self, write: Write) -> None:
        """The leader writes on the storage thread: meanwhile its loop keeps taking requests and acks.
        Any other member writes on the loop: it has nothing to do before its ack but wait for the
        fsync, and the hop to the thread and back (two GIL handoffs) costs more than the write."""
        if self.is_leader:
            await self._in_storage(self.handler.persist, write)
        else:
            self.handler.persist(write)

    # ------------------------------------------------------------------ what the handler tells the node

    def on_fsync(self, took_s: float, entries: int) -> None:
        self.metrics.wal_fsync.observe(took_s)

    def on_read_state(self, index: int, ctx: bytes) -> None:
        self.read_index.on_read_state(index, ctx)

    def on_soft_state(self, leader_id: int, role: StateRole) -> None:
        was_leader = self.role == StateRole.LEADER
        if leader_id != self.leader_id and leader_id:
            self.metrics.leader_changes += 1
        if leader_id != self.leader_id or role != self.role:
            log.info("member %d is now %s; leader is %s", self.id, ROLE_NAMES[role], leader_id or "unknown",
                     extra=event("leader-changed", role=ROLE_NAMES[role], leader=leader_id))
            self._leader_changed.set()
            self._leader_changed = asyncio.Event()
        self.leader_id, self.role = leader_id, role
        if self._members is not None and self.id not in self._members.ids and role != StateRole.LEADER:
            self._stop_removed()
        if was_leader and role != StateRole.LEADER:
            self._queued.clear()  # their waiters fail just below; never propose them in a later term
            self.proposals.fail_all(leadership_lost())
            self.read_index.fail_pending(self.redirect())

    def on_hard_state(self, hs) -> None:
        if hs.term > self.term:
            self.term = hs.term
            self.proposals.fail_older_than(hs.term, leadership_lost())
        self.commit_index = max(self.commit_index, hs.commit)

    async def _install_snapshot(self, meta: SnapshotMetadata) -> None:
        """The INSTALL step, on the storage thread (ReadyHandler.install_snapshot orders its steps)."""
        await self._drain_apply()  # earlier entries first, and nothing may write the old environment
        if self._checkpointing is not None:  # its log record and compaction must not follow the reset
            await asyncio.shield(self._checkpointing)
        self._sm_readable.clear()  # range() must not run while the LMDB environment is swapped
        try:
            await self._in_storage(self.handler.install_snapshot, meta)
        finally:
            self._sm_readable.set()
        self.snapshot_index = meta.index
        self.read_index.on_applied(self.sm.applied_index)
        self._sync_members()
        self.watch_hub.notify()

    async def _start_apply(self, entries) -> None:
        """An APPLY step: queue `entries`; wait only if the backlog is over its bound.

        One apply runs at a time, in order, each taking everything committed
        while the previous one ran: under load the batches grow, so LMDB
        commits (and their fsync and page writes) are shared by more entries,
        and the Ready loop never waits for LMDB to start the next WAL fsync.
        With no apply running, a small backlog is applied at once on the loop
        instead (`_apply_inline`).
        """
        pipeline = self.pipeline
        pipeline.submit(entries)
        if self._applying is None and pipeline.may_apply_inline():
            self._apply_inline()
        elif self._applying is None:
            self._applying = watch(asyncio.ensure_future(self._apply_backlog_loop(self._submit_backlog())),
                                   "applying committed entries")
        elif pipeline.over_bound():
            await self._drain_apply()

    def _apply_inline(self) -> None:
        """Apply the backlog right here on the event loop (the usual case, under load too).

        Only while no apply runs on the thread (they would race for the LMDB
        write lock and the order), and only when the LMDB commit does not
        fdatasync (that would stall the loop). A few µs per put: the bound
        keeps the loop's stall to milliseconds; bigger backlogs (a member
        catching up) go to the apply thread.
        """
        batch = self.pipeline.take()
        try:
            self._timed_apply(batch, None)
        except Exception as e:  # never go on past an entry we could not apply
            fatal("applying committed entries", e)
        self.pipeline.finish(batch)

    def _submit_backlog(self) -> tuple[ApplyBatch, asyncio.Future]:
        """Hand the whole backlog to the apply thread as one batch (one LMDB transaction).

        Reads keep seeing their own writes although clients are answered
        before LMDB commits (ApplyPipeline.run): a linearizable read waits for
        the state machine to reach its read index, and any read on this
        member waits until what was answered is committed to LMDB
        (`_answered_index`).
        """
        batch = self.pipeline.take()
        loop = asyncio.get_running_loop()

        def answer_early(last: int, origins: list, results: list) -> None:  # on the apply thread
            loop.call_soon_threadsafe(self.answer, last, origins, results)

        apply = guarded("applying committed entries (apply thread)", self._timed_apply, batch, answer_early)
        return batch, loop.run_in_executor(self.apply_thread, apply)

    def _timed_apply(self, batch: ApplyBatch, answer) -> None:
        """ApplyPipeline.run, timed for the commit histogram and the slow-apply count."""
        t0 = time.monotonic()
        self.pipeline.run(batch, answer)
        took = time.monotonic() - t0
        self.metrics.backend_commit.observe(took)
        if took > SLOW_APPLY_S:
            self.metrics.slow_applies += 1

    def answer(self, last_index: int, origins: list, results: list) -> None:
        self._answered_index = max(self._answered_index, last_index)
        self.proposals.resolve_applied(origins, results)

    async def _apply_backlog_loop(self, submitted) -> None:
        try:
            while submitted is not None:
                batch, applying = submitted
                try:
                    await applying
                except Exception as e:  # never go on past an entry we could not apply
                    fatal("applying committed entries", e)
                submitted = self._submit_backlog() if self.pipeline.backlog else None  # runs while we answer
                self.pipeline.finish(batch)
        finally:
            self._applying = None

    async def _drain_apply(self) -> None:
        """Wait until everything queued is applied (before a snapshot, an install, or closing)."""
        while self._applying is not None:
            await asyncio.shield(self._applying)  # a cancelled loop must not cancel an apply half way

    def applied(self, index: int) -> None:
        """The state machine committed everything up to `index`: release the reads waiting for it."""
        self.commit_index = max(self.commit_index, index)
        self.read_index.on_applied(index)
        self._sync_members()
        self.watch_hub.notify()
        self.space_quota.measure()
        while self._lmdb_waiters and self._lmdb_waiters[0][0] <= index:
            _index, _tiebreak, fut = heapq.heappop(self._lmdb_waiters)
            if not fut.done():
                fut.set_result(None)

    async def _maybe_snapshot(self) -> None:
        """Start a checkpoint in the background when one is due; never wait for it.

        A snapshot (a checkpoint that also compacts the log) is due every
        --snapshot-count entries, members spread over the interval: member k
        of n (in id order) at j * count + k * count / n, so no two compact at
        the same moment; or once the WAL holds a few segments. In between, a
        base sync alone is due --backend-batch-interval after the last one, when
        anything was applied since: it bounds the pages pinned by the base.
        """
        if self._checkpointing is not None or self.cfg.snapshot_count <= 0:
            return
        applied = self.sm.applied_index
        if applied <= self._base_index:
            return
        compact = applied >= next_checkpoint_at(self.snapshot_index, self.cfg.snapshot_count, self.member_ids,
                                                self.id) or self.log.wal_size() >= self._wal_checkpoint_bytes
        if compact or time.monotonic() >= self._next_base_sync_at:
            self._checkpointing = asyncio.ensure_future(self._checkpoint(compact))

    def _draw_wal_checkpoint_bytes(self) -> int:
        return int(self.cfg.wal_segment_bytes * CHECKPOINT_WAL_SEGMENTS * (1 + random.random() / 2))

    async def _checkpoint(self, compact: bool) -> None:
        """Make the state machine the durable base, then (a snapshot) let the log go behind it.

        The WAL is compacted only behind the base's applied index (minus a
        tail kept for slow followers, see _catchup_entries): after a process
        crash the LMDB file is newer still,
        and after an OS crash the boot guard rolls it back to exactly that
        base (durable_base.py), so replay always finds every entry after what
        the state machine holds.
        """
        try:
            t0 = time.monotonic()
            index, term = await asyncio.to_thread(self.sm.checkpoint)  # the sync runs while applies go on
            done = time.monotonic()
            synced_s = done - t0
            self.metrics.snapshot_save.observe(synced_s)
            self._base_index = max(self._base_index, index)
            self._next_base_sync_at = done + self.cfg.backend_batch_interval_s
            if not compact and log.isEnabledFor(logging.DEBUG):
                log.debug("durable base at index %d (LMDB synced in %.0f ms)", index, synced_s * 1000)
            if self._stopped or not compact:  # close() owns the log from now on (and syncs LMDB itself)
                return
            meta = SnapshotMetadata(index=index, term=term, conf_state=self.members.conf_state())
            await self._in_storage(self.log.set_snapshot, meta)
            compact_to = index - self._catchup_entries()
            self._wal_checkpoint_bytes = self._draw_wal_checkpoint_bytes()
            log.info("snapshot saved at index %d (a checkpoint: LMDB synced in %.0f ms)", index, synced_s * 1000,
                     extra=event("snapshot-saved", index=index))
            if compact_to > self.log.first_index() and not self._stopped:
                await self._in_storage(self.log.compact, compact_to)
                log.info("log compacted: entries before %d dropped", compact_to,
                         extra=event("log-compacted", compact_index=compact_to))
            self.snapshot_index = max(self.snapshot_index, index)  # status shows it once the log went
        except asyncio.CancelledError:
            raise
        except StateMachineClosed:
            pass  # closed by close() first: nothing was checkpointed, nothing compacted
        except Exception as e:  # a failed sync or log write: the base cannot be trusted
            fatal(f"checkpoint of the state machine in {os.path.join(self.cfg.data_dir, 'db')} failed", e)
        finally:
            self._checkpointing = None

    def _catchup_entries(self) -> int:
        """Entries kept behind a checkpoint for followers a little behind: --snapshot-catchup-entries,
        but, while the WAL is over its size bound, about one segment's worth at most (big coalesced
        entries would otherwise keep GiBs of log; a follower further behind gets an image)."""
        keep = self.cfg.snapshot_catchup_entries
        size, entries = self.log.wal_size(), self.log.last_index() - self.log.first_index() + 1
        if size < self._wal_checkpoint_bytes or entries <= 0:
            return keep
        return min(keep, max(1, entries * self.cfg.wal_segment_bytes // size))

    def _open_image(self, index: int) -> tuple[int, int, ImageReader]:
        """A follower needs a snapshot at `index` or later: the state machine streamed as it is now.
        Failing to produce or read the image is fatal (a closed state machine: shutting down)."""
        try:
            at, term, stream = self.sm.open_image()
        except StateMachineClosed:
            raise
        except Exception as e:
            fatal(f"streaming a snapshot image of {os.path.join(self.cfg.data_dir, 'db')}", e)
        members = stream.members
        return at, term, SupervisedReader(cast(BinaryIO, stream), f"streaming snapshot {at}",
                                          None if members is None else members.conf_state())

    def open_image_for_backup(self) -> tuple[int, int, ImageReader]:
        """(index, term, reader) of the state machine as it is now, for `kvstore snapshot save`."""
        return self._open_image(0)

    def _open_log(self, applied_index: int) -> RaftLog:
        """Open the WAL; a torn write it refuses ends the process with the repair command."""
        try:
            return RaftLog.open(os.path.join(self.cfg.data_dir, "wal"), self.cfg.wal_segment_bytes, applied_index)
        except WalCorruptionError as e:
            fatal(f"opening the WAL: {e}; {repair_hint(self.cfg.data_dir)}")

    async def _in_storage(self, fn, *args) -> Any:
        """Run a storage call on the storage thread; if it raises, the process ends (fail-stop)."""
        name = getattr(getattr(fn, "func", fn), "__qualname__", repr(fn))
        return await asyncio.get_running_loop().run_in_executor(
            self.storage_thread, guarded(f"the storage thread ({name})", fn, *args))

    # ------------------------------------------------------------------ transport callbacks

    def step(self, m: Message) -> None:
        """A message from a peer. Anything the core raises but ProposalDropped is a broken invariant."""
        if self._stopped:
            return
        try:
            self.raw.step(m)
        except ProposalDropped:
            pass  # a forwarded proposal we cannot take; the sender times out
        except Exception as e:  # the core's state is half changed: never step it again
            fatal(f"raft step of {m.type.name} from member {m.frm} (term {m.term}, index {m.index})", e)
        self._wake.set()

    def _report_unreachable(self, peer_id: int) -> None:
        if not self._stopped:
            try:
                self.raw.report_unreachable(peer_id)
            except Exception as e:
                fatal(f"raft report_unreachable({peer_id})", e)
            self._wake.set()

    def _report_snapshot(self, peer_id: int, ok: bool) -> None:
        if not self._stopped:
            try:
                self.raw.report_snapshot(peer_id, ok)
            except Exception as e:
                fatal(f"raft report_snapshot({peer_id})", e)
            self._wake.set()

    # ------------------------------------------------------------------ what the services call

    @property
    def is_leader(self) -> bool:
        return self.role == StateRole.LEADER

    def redirect(self) -> RequestFailed:
        if self.leader_id == self.id:
            return no_leader()
        return not_leader(self.leader_id, self.cfg.clients)

    def check_serving(self) -> None:
        if self.draining:
            raise shutting_down()

    def check_leader(self) -> None:
        """Raise the redirect unless this member is the leader."""
        self.check_serving()
        if not self.is_leader:
            raise self.redirect()

    def header(self) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(
            cluster_id=self.cfg.cluster_id,
            member_id=self.id,
            revision=self.sm.revision,
            raft_term=self.term,
        )

    async def propose(self, ops, request_id: kv_pb2.RequestId | None, timeout: float, user: str | None = None,
                      auth_revision: int = 0):
        """Propose mutations (of ``user``, checked at ``auth_revision``, with auth enabled); return the
        state machine's CommandResult (or its ApplyError)."""
        self.check_leader()
        self.space_quota.check(ops)
        pid = self.proposals.next_id()
        # CLOCK_MONOTONIC, never the wall clock: it drives session expiry (log_clock.py).
        stamp = time.time_ns() if self.cfg.testing_wall_clock_sessions else time.monotonic_ns()
        cmd = command_pb2.Command(ops=ops, leader_clock_ms=stamp // 1_000_000, proposal_id=pid)
        if user:
            cmd.auth_user = user
            cmd.auth_revision = auth_revision
        key = (0, 0)
        if request_id is not None:
            cmd.request_id.CopyFrom(request_id)
            key = (request_id.client_id, request_id.seq)
        fut = self.proposals.register(pid, self.term, key, deadline=asyncio.get_running_loop().time() + timeout)
        self._queued.append((pid, cmd.SerializeToString()))  # proposed with the next batch
        self._wake.set()
        if self.cfg.testing_ack_before_commit:
            self._propose_queued()  # at least in the leader's log before the invented answer
            self.proposals.forget(pid)
            return None  # the service invents an answer: TESTING ONLY
        try:
            return await fut  # Proposals fails it "outcome unknown" once the deadline passes
        finally:
            self.proposals.forget(pid)

    async def propose_internal(self, cmd: command_pb2.Command, timeout: float):
        """Propose a command of the cluster's own (no client ops: a hash barrier, an alarm); its result."""
        self.check_leader()
        pid = cmd.proposal_id = self.proposals.next_id()
        stamp = time.time_ns() if self.cfg.testing_wall_clock_sessions else time.monotonic_ns()
        cmd.leader_clock_ms = stamp // 1_000_000  # as propose() stamps it (log_clock.py)
        fut = self.proposals.register(pid, self.term, (0, 0), deadline=asyncio.get_running_loop().time() + timeout)
        self._queued.append((pid, cmd.SerializeToString()))
        self._wake.set()
        try:
            return await fut
        finally:
            self.proposals.forget(pid)

    async def change_membership(self, cc: ConfChange, timeout: float) -> MemberSet:
        """Propose one membership change and wait until it is applied here; the member set after it.

        Refusals (kvstore.raft.ConfChangeRefused: one change at a time, a learner
        behind, a quorum at risk) are FAILED_PRECONDITION with the core's reason.
        """
        self.check_leader()
        try:
            self.raw.propose_conf_change(cc, force=not self.cfg.strict_reconfig_check)
        except ConfChangeRefused as e:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, str(e), not_applied=True) from None
        except ProposalDropped:
            raise self.redirect() from None
        index, term = self.raw.raft.log.last_index(), self.term
        self._wake.set()
        try:
            await asyncio.wait_for(self.wait_applied(index), timeout)
        except TimeoutError:
            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the membership change (log index {index}) was not applied within {timeout:.1f}s; "
                                f"see `kvstore member list` for whether it was made", not_applied=False) from None
        try:
            made = self.log.term(index) == term
        except Exception:  # compacted already: it was applied in some term; say so as unknown
            made = False
        if not made:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                "leadership changed before the membership change committed; see `kvstore member "
                                "list` for whether it was made", not_applied=False)
        return self.members

    async def wait_applied(self, index: int) -> None:
        """Return once the state machine has applied (and committed to LMDB) entry `index`."""
        if index > self.sm.applied_index:
            fut = asyncio.get_running_loop().create_future()
            heapq.heappush(self._lmdb_waiters, (index, id(fut), fut))
            await fut

    async def read_barrier(self, timeout: float) -> None:
        """Return when a linearizable read may be served from the local state machine."""
        if self.cfg.testing_unsafe_local_reads:
            self.check_serving()
            return
        self.check_leader()
        await self.read_index.wait(deadline=asyncio.get_running_loop().time() + timeout)

    def _request_read_index(self, ctx: bytes) -> None:
        try:
            self.raw.read_index(ctx)
        except ProposalDropped:
            asyncio.get_running_loop().call_soon(self.read_index.fail_pending, self.redirect())
        except Exception as e:
            fatal("raft read_index", e)
        self._wake.set()

    def _read_timeout(self) -> RequestFailed:
        return RequestFailed(grpc.StatusCode.UNAVAILABLE, "leadership not confirmed in time (partitioned?)",
                             not_applied=True)

    async def wait_readable(self) -> None:
        """Wait out a snapshot install (the LMDB environment is being swapped)."""
        while not self._sm_readable.is_set():
            await self._sm_readable.wait()

    async def _see_answered_writes(self) -> None:
        """Wait until every write this member has answered is committed to LMDB (see _submit_backlog)."""
        index = self._answered_index
        if index > self.sm.applied_index:
            fut = asyncio.get_running_loop().create_future()
            heapq.heappush(self._lmdb_waiters, (index, id(fut), fut))
            await fut

    async def range(self, request: kv_pb2.RangeRequest) -> kv_pb2.RangeResponse:
        check_not_corrupt(self)
        await self._see_answered_writes()
        await self.wait_readable()
        resp = self.sm.range(request)
        resp.header.CopyFrom(self.header())
        return resp

    async def range_many(self, requests: list, out: list) -> list:
        """Serve already-validated reads into `out`, all from one LMDB read transaction; their results
        (a RevisionError where a read's revision is compacted or not reached)."""
        check_not_corrupt(self)
        await self._see_answered_writes()
        await self.wait_readable()
        # No await from here on: the environment cannot be swapped under the read.
        return self.sm.range_many(requests, out, header=self.header(), validated=True)

    def most_up_to_date_follower(self) -> int:
        progress = self.raw.status().progress
        best, best_match = 0, -1
        for pid, pr in progress.items():
            if pid != self.id and pr.match > best_match:
                best, best_match = pid, pr.match
        return best

    async def transfer_leadership(self, target: int, timeout: float) -> int:
        if not self.is_leader:
            raise self.redirect()
        if target == 0:
            target = self.most_up_to_date_follower()
        if target == self.id:
            return self.id
        if target not in self.cfg.peers:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"member {target} is not in the cluster",
                                not_applied=True)
        if target in self.members.learners:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"member {target} is a learner; promote it before it can lead", not_applied=True)
        self.raw.transfer_leader(target)
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.leader_id != target:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"leadership did not move to member {target} in {timeout:.1f}s",
                                    not_applied=True)
            try:
                await asyncio.wait_for(self._leader_changed.wait(), left)
            except TimeoutError:
                pass
        return target

    def status(self) -> dict:
        st = self.raw.status()
        return dict(
            member_id=self.id,
            role=ROLE_NAMES[self.role],
            term=st.term,
            leader_id=self.leader_id,
            commit_index=st.commit,
            applied_index=self.sm.applied_index,
            wal_size=self.log.wal_size(),
            db_size=self.sm.db_size(),
            snapshot_index=self.snapshot_index,
            version=__version__,
            errors=[f"memberID:{m} alarm:{a}" for m, a in sorted(self.sm.alarms)],
        )
