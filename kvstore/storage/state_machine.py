"""The replicated state machine: committed Raft entries applied to LMDB.

Each committed entry's data is a serialized `Command`; applying it yields a
`CommandResult` (one `ResponseOp` per op). A whole batch of entries is applied
in ONE LMDB write transaction that also records the applied index and term, so
after a crash the store is exactly "every entry up to applied_index" and the
node replays its WAL from applied_index + 1.

Results. `apply` returns, per entry, in order:
  * None: the entry was skipped (index <= applied_index, i.e. a replay after a
    restart) or carried no data (the leader's no-op);
  * a `CommandResult`: applied (or, for a retry, the original stored answer);
  * an `ApplyError` (kvstore.storage.errors): the command was rejected as a
    whole and none of it applied: malformed data or an invalid op
    (INVALID_ARGUMENT), a retry whose answer was forgotten or whose session
    expired (FAILED_PRECONDITION), too many unacknowledged answers
    (RESOURCE_EXHAUSTED). `grpc.StatusCode[err.code.name]` is its status.
  apply only raises for failures of the environment (disk, map full): those
  are not deterministic, so the node must stop rather than diverge.

Revisions (etcd-like). The store revision increases by one per mutating op of
a command: a put always; a delete_range only if it deleted something; a txn
once if its chosen branch changed anything (every write of one txn, including
nested txns, shares that revision). The ops of a Batch command are
independent, so a Batch of 64 puts advances the revision by 64 and each put
gets its own mod_revision. Every response header carries the revision after
its op; all responses inside a txn carry the txn's final revision.
CommandResult.revision is the revision after the whole command.

History (MVCC). Every write is also recorded as an event in the history
sub-database, and a delete in the tombstones one (layout and compaction in
history.py), in the same transaction: reads at an older revision, and
watches, are served from there until a replicated compaction
(Command.compaction) discards it. The removal runs in bounded steps, one per
applied batch (or compact_pending when idle).

Durability. By default each apply transaction is committed with LMDB's
sync=True, metasync=False: one fdatasync of the data pages per batch, the meta
page flushed by the next commit. LMDB then guarantees integrity across a power
loss and may lose at most the last batch, which WAL replay re-applies.
fsync=False (sync=False) skips that fdatasync (faster; for tests and
benchmarks, or when integrity after an OS crash is not needed). checkpoint()
syncs everything and makes it the durable base (durable_base.py): WAL
segments are dropped only behind a checkpoint.
A node runs fsync=False with boot_guard=True: no fdatasync per batch (it cost
~20% of a write's CPU on every member), and an OS crash, the one event that can
tear an unsynced LMDB file, is detected at the next open by the kernel's boot
id (see boot_guard.py); the state machine is then rolled back to its durable
base, and the WAL, which is always synced, replays the rest.
Unsynced commits write through the map (MDB_WRITEMAP), which keeps every
page ever written resident in the node; checkpoint() gives them back to the
page cache (map_pages.py), so the node holds its working set, not its file.

Layout. `path` is a directory holding generations of the LMDB environment
(gen-000001/, ...) and a `current` symlink naming the live one; installing a
snapshot writes a new generation and swaps the symlink atomically.

Threading: apply, install_snapshot and close from one thread at a time;
range() may run concurrently with apply (LMDB readers never block the writer)
but not with install_snapshot or close. checkpoint() and open_image() may run
on other threads at any time: they, install_snapshot and close serialize on
one lock, and install_snapshot and close end the image streams first.
"""
from __future__ import annotations

import bisect
import logging
import os
import shutil
import struct
import threading
import time
from typing import NoReturn
from collections.abc import Callable, Iterable, Sequence

import lmdb
from google.protobuf.message import DecodeError

from kvstore.raft.confchange import decode_conf_change
from kvstore.v1 import command_pb2, kv_pb2

from . import alarms as alarm_set
from . import boot_guard as guard
from . import durable_base, history, keys, map_pages, quota, validation
from .auth_store import AuthState, AuthStore
from . import leases as lease_store
from .durable_files import fsync_dir, fsync_file
from .errors import ApplyError, ErrorCode, InvalidRequest
from .hash_kv import HashMark, hash_kv
from .plain_puts import PlainPuts
from .log_clock import LogClock
from .members import MemberSet
from .sessions import DEFAULT_MAX_PENDING, DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL_MS, SessionTable, Verdict
from .storage_fault import failing_as
from .txn import compare_holds

__all__ = ["StateMachine", "ApplyError", "ErrorCode", "SnapshotImageError", "StateMachineClosed", "StoreLayoutError"]

_META_KEY = b"state"
_HIST_KEY = history.REV.pack
_VALUE = kv_pb2.Compare.CompareTarget.VALUE
record_of = history.record_of
value_of = history.value_of
_PUT_HEADS = history.PUT_HEADS
_NO_PREV = history.NO_PREV
_WRITE_KEY = keys.WRITE_KEY
_ALARMS_KEY = b"alarms"
_MEMBERS_KEY = b"members"  # the member set (members.py), changed by applied entries only
HASHES_KEPT = 64  # hash barriers remembered, newest first out (a check asks within seconds)
_META = struct.Struct(">QQqQQQ")  # applied_index, applied_term, revision, then the LogClock
_META_HEAD = struct.Struct(">QQq")  # the first three: read by every layout
_LEGACY_LOG_TIME = struct.Struct(">Q")  # after the head in the layout before the LogClock
_RECORD_HEADER = keys.RECORD_HEADER  # packed inline on the put path


def _read_meta(txn: lmdb.Transaction[bytes], meta_db: lmdb._Database) -> tuple[int, int, int]:
    """(applied_index, applied_term, revision): written with the store, never deleted."""
    raw = txn.get(_META_KEY, db=meta_db)
    if raw is None:
        raise lmdb.CorruptedError(f"state machine metadata record {_META_KEY!r} is missing")
    return _META_HEAD.unpack_from(raw)
def _required(raw: bytes | None) -> bytes:
    """A record the store always holds (written at its creation)."""
    if raw is None:
        raise lmdb.CorruptedError("a state machine metadata record is missing")
    return raw


_DB_NAMES = (b"latest", b"meta", b"sessions", b"answers", b"expiry", b"history", b"tombstones", b"auth",
             *lease_store.DB_NAMES)
_COMPACT_KEY = b"compact"  # compacted-to revision, then where its removal resumes (absent: done)
_COMPACT = struct.Struct(">q")
_CURRENT = "current"
_GEN_PREFIX = "gen-"

log = logging.getLogger("kvstore.storage")

DISK_RESERVE_MIN = 256 << 10  # data file allocated ahead of use, with MDB_WRITEMAP (see _reserve_disk)
DISK_RESERVE_MAX = 64 << 20  # ... and at most this much ahead, however large the file
#: A checkpoint gives back the map's resident pages (map_pages.py) at most this often: what a node
#: writes or reads within it is all of the map it holds; its hot pages fault back in after each.
#: Measured (3 members, 256 clients, 100k keys, 90 s of puts): peak RSS 353-369 MiB against 516-540
#: (and growing with the file) without; the refaults cost ~3.6% of put throughput. Every 0.25 s:
#: 278-295 MiB, but ~7%.
MAP_RELEASE_INTERVAL_S = 1.0


class SnapshotImageError(Exception):
    """A snapshot image is not a usable state machine image."""


class StoreLayoutError(SnapshotImageError):
    """A store or image written with an older layout (see _OLD_LAYOUT_DBS), which this version cannot read."""


# Sub-databases of older layouts (history.py): key_revs, the key -> revisions index that
# history chains replaced; kv, which held each key's value besides its history event.
_OLD_LAYOUT_DBS = (b"key_revs", b"kv")


def _check_layout(txn: lmdb.Transaction[bytes], where: str) -> None:
    """Refuse an older layout: no migration (there is no released data format)."""
    for name in _OLD_LAYOUT_DBS:
        if txn.get(name) is not None:  # the main db names every named db
            raise StoreLayoutError(f"{where}: written by an older version (it has a {name.decode()} db); "
                                   "this one cannot read it: start the member with an empty data dir")


class StateMachineClosed(Exception):
    """The state machine was closed (by another thread) before the call."""


def _open_env(path: str, map_size: int, fsync: bool, **kw) -> lmdb.Environment:
    """fsync=False also maps the file writable (MDB_WRITEMAP): a commit then copies no
    pages (apply_bench, 64-put entries: ~130k -> ~180k puts/s). With fdatasync per
    commit it does not pay (msync of the map); nor does it change what a process crash
    can do: an uncommitted transaction only writes pages the last commit does not use.
    (WRITEMAP rules out nested transactions, which the state machine does not use.)"""
    return lmdb.open(
        path,
        map_size=map_size,
        max_dbs=len(_DB_NAMES),
        sync=fsync,
        metasync=False,
        readahead=False,
        writemap=not fsync,
        **kw,
    )


def read_image_meta(image_path: str) -> tuple[int, int, int]:
    """(applied_index, applied_term, revision) stored inside an LMDB image file."""
    try:
        env = lmdb.open(image_path, subdir=False, readonly=True, lock=False, max_dbs=len(_DB_NAMES))
    except lmdb.Error as e:
        raise SnapshotImageError(f"{image_path}: not an LMDB image: {e}") from None
    try:
        # A truncated image would fault (SIGBUS) when a missing page is touched.
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        have = os.path.getsize(image_path)
        if have < need:
            raise SnapshotImageError(f"{image_path}: truncated ({have} of {need} bytes)")
        with env.begin() as txn:
            _check_layout(txn, image_path)
            try:
                meta_db = env.open_db(b"meta", txn=txn, create=False)
            except lmdb.Error:
                raise SnapshotImageError(f"{image_path}: no state machine metadata") from None
            raw = txn.get(_META_KEY, db=meta_db)
        if raw is None:
            raise SnapshotImageError(f"{image_path}: no state machine metadata")
        index, term, revision = _META_HEAD.unpack_from(raw)
        return index, term, revision
    finally:
        env.close()


def image_hash(image_path: str) -> tuple[int, int]:
    """(key count, hash) of a state machine image file: the hash HashKV reports at its revision."""
    env = lmdb.open(image_path, subdir=False, readonly=True, lock=False, max_dbs=len(_DB_NAMES))
    try:
        latest = env.open_db(b"latest", create=False)
        meta = env.open_db(b"meta", create=False)
        hist = env.open_db(b"history", create=False)
        with env.begin(db=latest) as txn:  # hash_kv reads the transaction's default database
            compact = txn.get(_COMPACT_KEY, db=meta)
            compact_rev = (_COMPACT.unpack_from(compact)[0] if compact is not None
                           else _META_HEAD.unpack_from(_required(txn.get(_META_KEY, db=meta)))[2])
            return txn.stat(latest)["entries"], hash_kv(txn, hist, _HIST_KEY(compact_rev, 0))
    finally:
        env.close()


class StateMachine:
    """Applies committed commands to LMDB; see the module docstring for the rules."""

    def __init__(
        self, root: str, map_size: int, *, fsync: bool, session_ttl_ms: int, max_pending: int, max_sessions: int
    ):
        self._root = root
        self._map_size = map_size
        self._fsync = fsync
        self._ttl_ms = session_ttl_ms
        self._max_pending = max_pending
        self._max_sessions = max_sessions
        # Test switches: never set outside tests.
        self.testing_disable_dedup = False
        # Log time = the largest leader_clock_ms seen, as when it was the leader's wall clock.
        self.testing_log_time_from_absolute_stamps = False
        self.testing_install_hook: Callable[[str], None] | None = None
        # Test switch: checkpoint() leaves its base unpinned (shows what the pin protects).
        self.testing_unpinned_base = False
        # Test switch: checkpoint() leaves the map's pages resident (shows what releasing them does).
        self.testing_keep_map_resident = False
        self._map_released_at = float("-inf")  # time.monotonic() of the last map_pages.release
        self._env: lmdb.Environment  # opened by _open_current
        self._closed = False
        self._hashes: dict[int, HashMark] = {}  # barrier index -> this member's hash there
        self._staged_alarms: frozenset | None = None  # set by an apply, visible once it commits
        self._staged_members: MemberSet | None = None  # likewise
        self._boot_guarded = False  # commits unsynced under a boot guard (see open)
        # The read transaction that keeps the durable base's pages from reuse (see durable_base.py).
        self._pin: lmdb.Transaction | None = None
        # checkpoint, image streams, install_snapshot and close may run on different threads.
        self._lifecycle = threading.RLock()
        self._streams: set[_ImageStream] = set()
        self._open_current()

    @classmethod
    def open(
        cls,
        path: str,
        map_size: int = 8 << 30,
        *,
        fsync: bool = True,
        boot_guard: bool = False,
        session_ttl_ms: int = DEFAULT_SESSION_TTL_MS,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> StateMachine:
        """Open (creating if needed) the state machine stored under `path`.

        boot_guard=True (with fsync=False): commits skip fdatasync, and a state
        machine left with unsynced commits by another boot is rolled back to its
        durable base (see durable_base.py; the node replays the WAL from there),
        or, without one, discarded (it opens empty; the node rebuilds it from a
        snapshot and the WAL). Where the kernel has no boot id, every commit is
        synced instead. Every open ends with a checkpoint: the base it leaves is
        pinned by this process.
        """
        if boot_guard and fsync:
            raise ValueError("boot_guard replaces the per-commit fdatasync: pass fsync=False with it")
        if not os.path.isdir(path):
            os.makedirs(path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))  # the new directory's entry
        # Checked in either mode: a node may restart with per-commit fsync after running unsynced.
        boot = guard.boot_id()
        if not guard.survived(path, boot):
            _recover_after_os_crash(path)
        if boot_guard:
            if boot is None:
                log.warning("no kernel boot id: the state machine syncs every commit instead")
                fsync = True
            else:
                guard.arm(path, boot)
        current = os.path.join(path, _CURRENT)
        if not os.path.lexists(current):
            # A fresh name: a generation left half-removed (a crash during a discard) is never reused.
            first = os.path.join(path, f"{_GEN_PREFIX}{_max_generation(path) + 1:06d}")
            os.makedirs(first)
            _open_env(first, map_size, True).close()
            fsync_dir(first)
            _point_current(path, os.path.basename(first))
        _remove_stale_generations(path)
        sm = cls(
            path, map_size, fsync=fsync, session_ttl_ms=session_ttl_ms, max_pending=max_pending,
            max_sessions=max_sessions,
        )
        sm._boot_guarded = guard.armed(path)  # also one left in this boot by an unsynced run: close() clears it
        sm.checkpoint()  # a base left by an earlier process is no longer pinned
        return sm

    def _open_current(self) -> None:
        env = _open_env(os.path.join(self._root, _CURRENT), self._map_size, self._fsync)
        try:
            with env.begin() as txn:
                _check_layout(txn, self.data_path)
        except StoreLayoutError:
            env.close()
            raise
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name, txn=txn) for name in _DB_NAMES}
            raw = txn.get(_META_KEY, db=dbs[b"meta"])
            if raw is None:
                raw = _META.pack(0, 0, 0, *LogClock())
                txn.put(_META_KEY, raw, db=dbs[b"meta"])
            compact = txn.get(_COMPACT_KEY, db=dbs[b"meta"])
            if compact is None:  # a store from before MVCC: its history starts here
                compact = _COMPACT.pack(_META_HEAD.unpack_from(raw)[2])
                txn.put(_COMPACT_KEY, compact, db=dbs[b"meta"])
            self._alarms = alarm_set.decode(txn.get(_ALARMS_KEY, db=dbs[b"meta"]))
            raw_members = txn.get(_MEMBERS_KEY, db=dbs[b"meta"])
            self._members = None if raw_members is None else MemberSet.decode(raw_members)
            self._auth = AuthStore(dbs[b"auth"], txn)
            self._leases = lease_store.LeaseStore(*(dbs[n] for n in lease_store.DB_NAMES))
            self._lease_ttls = self._leases.load(txn)
            self._staged_leases: dict[int, int] | None = None  # set by an apply, visible once it commits
        self._nospace = alarm_set.has(self._alarms, alarm_set.NOSPACE)
        self._dbs = tuple(dbs.values())
        self._env = env
        self._psize = env.stat()["psize"]
        self._reserved = 0  # bytes of the data file allocated ahead (see _reserve_disk)
        self._latest = dbs[b"latest"]
        self._meta = dbs[b"meta"]
        self._hist = dbs[b"history"]
        self._tombs = dbs[b"tombstones"]
        self._compact_rev = _COMPACT.unpack_from(compact)[0]
        self._compact_resume: bytes | None = compact[_COMPACT.size:] or None
        self._sessions = SessionTable(
            dbs[b"sessions"], dbs[b"answers"], dbs[b"expiry"],
            ttl_ms=self._ttl_ms, max_pending=self._max_pending, max_sessions=self._max_sessions,
        )
        self._applied_index, self._applied_term, self._revision = _META_HEAD.unpack_from(raw)
        if len(raw) == _META.size:
            self._clock = LogClock(*_META.unpack(raw)[3:])
        else:  # written before the log clock: its log time was the largest wall-clock stamp
            self._clock = LogClock(_LEGACY_LOG_TIME.unpack_from(raw, _META_HEAD.size)[0])

    # ---- state -------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def applied_term(self) -> int:
        return self._applied_term

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def syncs_commits(self) -> bool:
        """Whether each apply's LMDB commit waits for an fdatasync (--state-machine-sync commit)."""
        return self._fsync

    @property
    def leases(self) -> dict[int, int]:
        """Every lease as of the last committed apply: id -> granted TTL in seconds (do not modify)."""
        return self._lease_ttls

    def lease_keys(self, lease_id: int) -> list[bytes]:
        """The keys attached to a lease, in key order."""
        with self._env.begin() as txn:
            return self._leases.keys_of(txn, lease_id)

    @property
    def alarms(self) -> frozenset[tuple[int, str]]:
        """The active alarms: (member_id, alarm name) pairs (see alarms.py)."""
        return self._alarms

    @property
    def members(self) -> MemberSet | None:
        """The member set as of the applied index (None: never set, a fresh state machine)."""
        return self._members

    def set_members(self, members: MemberSet, only_if_unset: bool = True) -> MemberSet:
        """Record a member set outside the log; the one in force afterwards.

        Two uses, both at start, before anything is applied: the initial member
        set of a fresh state machine (the same flags on every member), and
        `--force-new-cluster` (only_if_unset=False), which makes this member
        the only one.
        """
        with self._env.begin(write=True) as txn:
            if only_if_unset and txn.get(_MEMBERS_KEY, db=self._meta) is not None:
                return self._members  # type: ignore[return-value]
            txn.put(_MEMBERS_KEY, members.encode(), db=self._meta)
        self._members = members
        return members

    @property
    def auth(self) -> AuthState:
        """The users, roles and permissions as of the last committed apply (see auth_store.py)."""
        return self._auth.state

    def hash_at(self, index: int) -> HashMark | None:
        """This member's hash at the barrier applied at `index`, if it applied one there recently."""
        return self._hashes.get(index)

    @property
    def log_time_ms(self) -> int:
        """The session expiry clock after the last applied entry (see log_clock.py)."""
        return self._clock.log_time_ms

    # ---- apply -------------------------------------------------------------

    def apply(
        self, entries: Iterable[tuple[int, int, bytes]], origins: list | None = None,
        before_commit: Callable[[list], None] | None = None,
    ) -> list[command_pb2.CommandResult | ApplyError | None]:
        """Apply committed (index, term, data) entries, in order, in one LMDB txn.

        origins, if given, gets one item per entry: (proposal_id, (client_id,
        seq)) of the entry's Command, or None where there is no Command. The
        proposing node resolves its waiters from it instead of parsing every
        Command a second time. before_commit, if given, gets the results once
        they are final, just before the transaction commits (the node answers
        clients from it while LMDB writes and syncs).
        """
        if not self._fsync:  # MDB_WRITEMAP
            entries = entries if type(entries) is list else list(entries)
            self._reserve_disk(sum(len(e[2]) for e in entries))
        results: list[command_pb2.CommandResult | ApplyError | None] = []
        applied_index, applied_term = self._applied_index, self._applied_term
        ex = _Executor(self._latest, self._hist, self._tombs, self._revision, self._leases)
        clock = self._clock
        parse = command_pb2.Command.FromString
        # latest: the default db (positional calls are cheaper); a failed write or commit names the file
        with failing_as("LMDB commit", self.data_path), self._env.begin(write=True, db=self._latest) as txn:
            ex.begin(txn)
            ex.leased_keys = self._leases.any_attached(txn)
            ex.has_lease = self._leases.has_lease_lookup(txn)
            sessions = self._sessions.batch(txn)
            for index, term, data in entries:
                if index <= applied_index:
                    results.append(None)
                    if origins is not None:
                        origins.append(None)
                    continue
                applied_index, applied_term = index, term
                if not data:
                    results.append(None)
                    if origins is not None:
                        origins.append(None)
                    continue
                try:
                    cmd = parse(data)
                except DecodeError as e:
                    results.append(ApplyError(ErrorCode.INVALID_ARGUMENT, f"malformed command: {e}"))
                    if origins is not None:
                        origins.append(None)  # no Command, so nobody to answer
                    continue
                clock = clock.advance(term, cmd.leader_clock_ms)
                if self.testing_log_time_from_absolute_stamps:
                    clock = LogClock(max(clock.log_time_ms, cmd.leader_clock_ms), term, cmd.leader_clock_ms)
                if not cmd.ops:  # internal: a hash barrier or an alarm change (clients' commands have ops)
                    ex.flush_history()  # a hash or a compaction reads it
                    results.append(self._apply_internal(txn, cmd, index, ex))
                    if origins is not None:
                        origins.append((cmd.proposal_id, (0, 0)))
                    continue
                rid = cmd.request_id
                results.append(self._apply_command(sessions, ex, cmd, rid, clock.log_time_ms))
                if origins is not None:
                    origins.append((cmd.proposal_id, (rid.client_id, rid.seq)))
            sessions.flush()
            ex.flush_history()
            self._compact_some(txn)
            if applied_index != self._applied_index:
                txn.put(_META_KEY, _META.pack(applied_index, applied_term, ex.revision, *clock), db=self._meta)
            if before_commit is not None:
                before_commit(results)
        # Only after the commit succeeded does the in-memory view move on.
        self._applied_index, self._applied_term = applied_index, applied_term
        self._revision, self._clock = ex.revision, clock
        if self._staged_alarms is not None:
            self._alarms, self._staged_alarms = self._staged_alarms, None
        if self._staged_members is not None:
            self._members, self._staged_members = self._staged_members, None
        self._auth.publish()
        if self._staged_leases is not None:
            self._lease_ttls, self._staged_leases = self._staged_leases, None
        return results

    def _apply_internal(self, txn, cmd: command_pb2.Command, index: int, ex: _Executor):
        """A command without client ops: hash here (a barrier), change the alarm list, grant or revoke a lease."""
        revision = ex.revision
        if cmd.hash_barrier:
            # txn sees this batch's earlier entries
            mark = HashMark(index, revision, hash_kv(txn, self._hist, _HIST_KEY(self._compact_rev, 0)))
            self._hashes[index] = mark
            while len(self._hashes) > HASHES_KEPT:
                del self._hashes[min(self._hashes)]
            return mark
        if cmd.conf_change or cmd.HasField("member_update"):
            members = self._members if self._staged_members is None else self._staged_members
            if members is None:
                raise ValueError("a membership change applied to a state machine without a member set")
            if cmd.conf_change:
                new = members.after_conf_change(decode_conf_change(cmd.conf_change))
            else:
                u = cmd.member_update
                new = members.after_update(u.member_id, list(u.peer_urls))
            self._staged_members = new
            txn.put(_MEMBERS_KEY, new.encode(), db=self._meta)
            return PlainPuts(0, revision)
        if cmd.HasField("compaction"):
            return self._compact(txn, cmd.compaction.revision, revision)
        if cmd.HasField("alarm"):
            a = cmd.alarm
            current = self._alarms if self._staged_alarms is None else self._staged_alarms
            self._staged_alarms = alarm_set.change(current, a.member_id, a.alarm, a.activate)
            txn.put(_ALARMS_KEY, alarm_set.encode(self._staged_alarms), db=self._meta)
            self._nospace = alarm_set.has(self._staged_alarms, alarm_set.NOSPACE)
            return self._staged_alarms
        if cmd.HasField("auth"):
            return self._auth.apply(txn, cmd)
        if cmd.HasField("lease"):
            return self._apply_lease(txn, cmd.lease, ex)
        return PlainPuts(0, revision)  # nothing to do (an empty command)

    def _apply_lease(self, txn, change: command_pb2.LeaseChange, ex: _Executor):
        """Grant a lease, or revoke one: its keys deleted by one txn of deletes (one revision)."""
        staged = dict(self._lease_ttls if self._staged_leases is None else self._staged_leases)
        if change.WhichOneof("change") == "grant":
            g = change.grant
            if not self._leases.grant(txn, g.id, g.ttl):
                return ApplyError(ErrorCode.FAILED_PRECONDITION, lease_store.LEASE_EXISTS)
            staged[g.id] = g.ttl
        else:
            lease_id = change.revoke
            if not self._leases.exists(txn, lease_id):
                return ApplyError(ErrorCode.NOT_FOUND, lease_store.LEASE_NOT_FOUND)
            doomed = self._leases.keys_of(txn, lease_id)
            if doomed:
                deletes = kv_pb2.TxnRequest(success=[
                    kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=k)) for k in doomed])
                ex.run_internal_op(kv_pb2.RequestOp(request_txn=deletes))
            self._leases.drop(txn, lease_id)
            staged.pop(lease_id, None)
        self._staged_leases = staged
        return command_pb2.CommandResult(revision=ex.revision)

    def _compact(self, txn, to: int, revision: int):
        """Apply a compaction to `to`: refused below the last one or past `revision` (etcd's rules)."""
        if to <= self._compact_rev:
            return ApplyError(ErrorCode.OUT_OF_RANGE, f"{history.COMPACTED} (asked for {to}, "
                                                      f"compacted to {self._compact_rev})")
        if to > revision:
            return ApplyError(ErrorCode.OUT_OF_RANGE, f"{history.FUTURE} (asked for {to}, current is {revision})")
        self._compact_resume = history.compaction_start(self._compact_rev, self._compact_resume)
        self._compact_rev = to
        self._save_compaction(txn)
        return PlainPuts(0, revision)

    def _compact_some(self, txn) -> None:
        """One bounded step of the pending compaction's removal (see history.py), in this batch."""
        if self._compact_resume is None:
            return
        self._compact_resume = history.compact_step(
            txn, self._hist, self._tombs, self._compact_rev, self._compact_resume, history.COMPACT_STEP_EVENTS,
        )
        self._save_compaction(txn)

    def _save_compaction(self, txn) -> None:
        txn.put(_COMPACT_KEY, _COMPACT.pack(self._compact_rev) + (self._compact_resume or b""), db=self._meta)

    @property
    def compact_revision(self) -> int:
        """Reads below this revision are refused (etcd's compacted revision)."""
        return self._compact_rev

    @property
    def compacting(self) -> bool:
        """Whether a compaction's removal still has history to walk (compact_pending drives it)."""
        return self._compact_resume is not None

    def compact_pending(self) -> None:
        """Run one step of a pending compaction's removal with no entry to apply (an idle member)."""
        if self._compact_resume is None:
            return
        with failing_as("LMDB commit", self.data_path), self._env.begin(write=True) as txn:
            self._compact_some(txn)

    def _reserve_disk(self, batch_bytes: int) -> None:
        """Allocate disk for the pages a batch may write, before it writes them.

        With MDB_WRITEMAP the data file is a sparse file as large as the map,
        and a page written into a hole of it on a full disk kills the process
        (SIGBUS). Allocated ahead, a full disk is an OSError (ENOSPC) before
        anything is written, and the node stops with that message. The
        reservation grows by an eighth of the size in use, within
        DISK_RESERVE_MIN and DISK_RESERVE_MAX (a large file is not allocated
        an eighth ahead: that would be disk held for nothing), and always
        covers 16 bytes of file per byte of the batch: a put of a few hundred
        bytes dirties about one 4 KiB page.
        """
        used = (self._env.info()["last_pgno"] + 1) * self._psize
        if used + 16 * batch_bytes + DISK_RESERVE_MIN // 2 <= self._reserved:
            return
        want = min(self._map_size, used + max(DISK_RESERVE_MIN, min(used // 8, DISK_RESERVE_MAX), 32 * batch_bytes))
        with failing_as("fallocate", self.data_path):
            fd = os.open(self.data_path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, want)
            finally:
                os.close(fd)
        self._reserved = want

    def _apply_command(self, sessions, ex: _Executor, cmd, rid, now_ms: int):
        sessions.expire(now_ms)
        try:
            validation.check_request_id(rid)
        except InvalidRequest as e:
            return ApplyError(ErrorCode.INVALID_ARGUMENT, str(e))
        if self._nospace and quota.command_adds_data(cmd):  # the same verdict on every member
            return ApplyError(ErrorCode.RESOURCE_EXHAUSTED, f"{quota.NO_SPACE} (NOSPACE alarm raised); "
                                                            "delete keys and compact the history to free space")
        if not rid.client_id:
            return self._auth.refusal(cmd) or _run_checked(ex, cmd)
        verdict, answer = sessions.check(rid, now_ms)
        if verdict is Verdict.REPLAY and self.testing_disable_dedup:
            verdict = Verdict.APPLY
        if verdict is not Verdict.APPLY:
            return answer
        result = self._auth.refusal(cmd) or _run_checked(ex, cmd)  # refused: recorded, a retry gets the same
        if not self.testing_disable_dedup:
            sessions.record(rid, result, puts_only=ex.puts_only)
        return result

    # ---- reads -------------------------------------------------------------

    def range(self, req: kv_pb2.RangeRequest) -> kv_pb2.RangeResponse:
        """A local (serializable) read; raises InvalidRequest for a bad request,
        history.RevisionError for a revision compacted or not reached."""
        validation.check_range(req)
        with self._env.begin(db=self._latest) as txn:
            revision = _read_meta(txn, self._meta)[2]
            if req.revision and req.revision != revision:
                return self._range_at(txn, req, revision, kv_pb2.RangeResponse())
            return _range_leased(txn, self._hist, req, revision, kv_pb2.RangeResponse(), self._lease_filler(txn))

    def _range_at(self, txn, req: kv_pb2.RangeRequest, revision: int, resp: kv_pb2.RangeResponse):
        """A read of the store as it was at req.revision, from the history (see history.py)."""
        compacted = _COMPACT.unpack_from(_required(txn.get(_COMPACT_KEY, db=self._meta)))[0]
        history.check_revision(req.revision, compacted, revision)
        resp.header.revision = revision
        at = req.revision
        found: Iterable[tuple[bytes, history.Version]]
        if not req.range_end:
            version = history.version_at(txn, self._latest, self._hist, self._tombs, req.key, at)
            found = [] if version is None else [(req.key, version)]
        else:
            end = keys.range_end_bound(req.key, req.range_end)
            if end is not None and end <= req.key:
                return resp
            found = history.versions_at(txn, self._latest, self._hist, self._tombs, req.key, end, at)
        leases = self._lease_filler(txn)
        count = 0
        for k, (record, lease) in found:
            count += 1
            if not req.count_only and (not req.limit or count <= req.limit):
                keys.add_key_value(resp.kvs, k, record, req.keys_only)
                if lease is None:  # the latest version: the key's lease now
                    lease = 0 if leases is None else leases.lease_of(txn, k)
                if lease:
                    resp.kvs[-1].lease = lease
        resp.count = count
        if not req.count_only:
            resp.more = count > len(resp.kvs)
        return resp

    def events(self, start: int, max_events: int, prev_kv: bool = False) -> tuple[list, int]:
        """Up to max_events history events from revision `start` on, whole revisions only
        (one revision's writes are never split), and the store's revision they were read at.

        Each item is (Event, the key's previous put or None; None also when prev_kv is false).
        Raises history.RevisionError if `start` is below the compacted revision.
        """
        out: list = []
        with self._env.begin() as txn:
            revision = _read_meta(txn, self._meta)[2]
            compacted = _COMPACT.unpack_from(_required(txn.get(_COMPACT_KEY, db=self._meta)))[0]
            if start < compacted:
                raise history.RevisionError(f"{history.COMPACTED} (asked for {start}, compacted to {compacted})")
            last = 0
            for ev in history.events_from(txn, self._hist, start, revision + 1):
                if len(out) >= max_events and ev.revision != last:
                    break
                last = ev.revision
                out.append((ev, history.previous(txn, self._hist, ev) if prev_kv else None))
        return out, revision

    def range_many(
        self,
        requests: Sequence[kv_pb2.RangeRequest],
        out: Sequence[kv_pb2.RangeResponse] | None = None,
        *,
        header: kv_pb2.ResponseHeader | None = None,
        validated: bool = False,
    ) -> list[kv_pb2.RangeResponse | InvalidRequest | history.RevisionError]:
        """Serve many local reads from ONE read transaction (one snapshot, one meta read).

        A Batch's reads cost one LMDB transaction instead of one each. Each
        answer is written into out[i] when given (e.g. a slot of the caller's
        BatchResponse, so nothing is copied afterwards), otherwise into a new
        RangeResponse. `header`, if given, is copied into every answer with the
        revision of the snapshot read. validated=True skips the checks the
        caller has already made; otherwise a bad request yields its
        InvalidRequest in its place and the others are still served. A read at
        a revision compacted or not reached yields its history.RevisionError.
        """
        results: list[kv_pb2.RangeResponse | InvalidRequest | history.RevisionError] = []
        with self._env.begin(db=self._latest) as txn:  # latest: the default db, as _range needs
            revision = _read_meta(txn, self._meta)[2]
            leases = self._lease_filler(txn)
            if header is not None:
                header = kv_pb2.ResponseHeader(
                    cluster_id=header.cluster_id, member_id=header.member_id,
                    raft_term=header.raft_term, revision=revision,
                )
            for i, req in enumerate(requests):
                if not validated:
                    try:
                        validation.check_range(req)
                    except InvalidRequest as e:
                        results.append(e)
                        continue
                resp = kv_pb2.RangeResponse() if out is None else out[i]
                if req.revision and req.revision != revision:
                    try:
                        self._range_at(txn, req, revision, resp)
                    except history.RevisionError as e:
                        results.append(e)
                        continue
                else:
                    _range_leased(txn, self._hist, req, revision, resp, leases)
                if header is not None:
                    resp.header.CopyFrom(header)
                results.append(resp)
        return results

    def _lease_filler(self, txn) -> lease_store.LeaseStore | None:
        """What fills KeyValue.lease in a range: None while no key has a lease (nothing to look up)."""
        return self._leases if self._leases.any_attached(txn) else None

    def get(self, key: bytes) -> kv_pb2.KeyValue | None:
        """The current record of one key, or None (convenience for tests/tools)."""
        with self._env.begin() as txn:
            raw = txn.get(key, db=self._latest)
            if raw is None:
                return None
            kv = keys.to_key_value(key, record_of(txn, self._hist, raw))
            kv.lease = self._leases.lease_of(txn, key)
            return kv

    def dump(self) -> dict[bytes, tuple[int, int, int, bytes]]:
        """Every key -> (create_revision, mod_revision, version, value); for tests."""
        with self._env.begin() as txn:
            return {
                k: (*keys.decode_header(v), keys.decode_value(record_of(txn, self._hist, v)))
                for k, v in txn.cursor(db=self._latest)
            }

    def dump_sessions(self) -> dict[int, tuple[int, int, dict[int, bytes]]]:
        """The session table (see SessionTable.dump); for tests."""
        with self._env.begin() as txn:
            return self._sessions.dump(txn)

    def key_count(self) -> int:
        """How many keys the store holds."""
        with self._env.begin() as txn:
            return txn.stat(self._latest)["entries"]

    @property
    def map_size(self) -> int:
        """The most the LMDB file may grow to: a full map fails every write (see quota.map_size_for)."""
        return self._map_size

    def testing_corrupt(self, key: bytes = b"\xffkvstore-testing-corruption") -> None:
        """TESTING ONLY: write a record no log entry made, so this member silently diverges."""
        # Its event's history key (revision 0, sub 1) is one no log entry can have: revisions start at 1.
        header = keys.encode_header(1, 0, 1, sub=1)
        with self._env.begin(write=True) as txn:
            txn.put(header[_WRITE_KEY], history.encode_put(key, header, b"diverged", history.NO_PREV), db=self._hist)
            txn.put(key, header, db=self._latest)

    def used_bytes(self) -> int:
        """Bytes of the pages holding data (what the quota counts; see quota.py)."""
        with self._env.begin() as txn:
            return quota.used_bytes(self._env, txn, self._dbs)

    def db_size(self) -> int:
        """Bytes of the LMDB file in use (high-water mark of its pages)."""
        info = self._env.info()
        return (info["last_pgno"] + 1) * self._env.stat()["psize"]

    # ---- durability and lifecycle -------------------------------------------

    @property
    def data_path(self) -> str:
        """The live LMDB data file (what a failed sync names)."""
        return os.path.join(self._root, _CURRENT, "data.mdb")

    def sync(self) -> None:
        """Force every committed transaction to disk; StorageFault if it fails."""
        # MDB_WRITEMAP (fsync=False) flushes the map with msync, otherwise LMDB fdatasyncs the file.
        with failing_as("fdatasync" if self._fsync else "msync", self.data_path):
            self._env.sync(True)

    def checkpoint(self) -> tuple[int, int]:
        """Make the newest commit the durable base (see durable_base.py); its (applied index, term).

        The WAL may then drop entries up to that index. The write lock is held
        only to pin the base and read its meta pages (microseconds); the syncs
        run while applies go on. Called from any thread, one at a time.

        Every page freed after the old base stays unused until the new base
        is saved, so the time from one pin to the next base saved is what the
        file grows by. Hence two syncs: the first, before the pin, writes what
        was dirtied since the last checkpoint; the second, after it, only what
        was dirtied during the first.
        """
        with self._lifecycle:
            env = self._env
            if self._closed:
                raise StateMachineClosed(f"the state machine in {self._root} is closed")
            gen_dir = os.path.realpath(os.path.join(self._root, _CURRENT))
            self.sync()  # most of what is dirty goes now, before the pin: the pinned window stays short
            writer = env.begin(write=True)  # no commit between the pin and the meta pages read
            try:
                pin = env.begin()
                index, term, _ = _read_meta(pin, self._meta)
                fd = os.open(os.path.join(gen_dir, durable_base.DATA_FILE), os.O_RDONLY)
                try:
                    pages = os.pread(fd, 2 * self._psize, 0)
                finally:
                    os.close(fd)
            finally:
                # Released by commit (nothing was written: LMDB writes nothing), never by abort:
                # py-lmdb's abort of a write transaction first waits until no LMDB call is in
                # flight in any thread. A snapshot image being copied to a follower is one, and
                # its copy goes on only as the event loop sends it, while the loop's apply waits
                # for this lock: a deadlock that stopped a leader for good (in py-lmdb 2.3, the
                # waiting apply counted too). See test_state_machine's write-lock test.
                writer.commit()
            try:
                self.sync()
                durable_base.save(gen_dir, index, term, self._psize, pages)
            except BaseException:
                pin.abort()
                raise
            old, self._pin = self._pin, pin
            if old is not None:
                old.abort()
            if self.testing_unpinned_base:
                self._pin.abort()
                self._pin = None
            self._release_map()
            return index, term

    def _release_map(self) -> None:
        """Give back the pages of the map this process holds, every MAP_RELEASE_INTERVAL_S at most.

        Everything committed was just synced, so the pages are clean; with
        MDB_WRITEMAP every page ever written would otherwise stay resident.
        Called under the lifecycle lock: the map stays mapped throughout.
        """
        now = time.monotonic()
        if self.testing_keep_map_resident or now - self._map_released_at < MAP_RELEASE_INTERVAL_S:
            return
        self._map_released_at = now
        with failing_as("madvise", self.data_path):
            map_pages.release(self.data_path)

    def close(self) -> None:
        with self._lifecycle:
            if not self._closed:
                self._closed = True
                self._end_streams()
                self._unpin()
                self.sync()  # a failure leaves the boot guard in place: the next open rolls back
                self._env.close()
                if self._boot_guarded:
                    guard.disarm(self._root)  # all on disk: the next boot may trust it

    def _unpin(self) -> None:
        if self._pin is not None:
            self._pin.abort()
            self._pin = None

    def open_image(self) -> tuple[int, int, _ImageStream]:
        """A consistent, compacted image of the store, streamed as it is produced: (index, term, stream).

        The image comes from one LMDB read transaction, copied by a thread
        into a pipe while applies go on; read it in chunks and close it (an
        early close stops the copy). Nothing is written to disk.
        """
        with self._lifecycle:
            if self._closed:
                raise StateMachineClosed(f"the state machine in {self._root} is closed")
            txn = self._env.begin()
            index, term, _ = _read_meta(txn, self._meta)
            raw_members = txn.get(_MEMBERS_KEY, db=self._meta)
            stream = _ImageStream(self._env, txn, self._streams)
            stream.members = None if raw_members is None else MemberSet.decode(raw_members)
            self._streams.add(stream)
        stream.start()
        return index, term, stream

    def _end_streams(self) -> None:
        """Stop every image stream (the environment is about to close)."""
        for stream in list(self._streams):
            stream.close()

    def copy_to(self, fd: int) -> tuple[int, int]:
        """Write a compacted, consistent image of the store to fd; its (index, term).

        The copy and the index/term it reports come from one read transaction,
        so the image is exactly the state at that applied index.
        """
        with self._env.begin() as txn:
            index, term = _read_meta(txn, self._meta)[:2]
            self._env.copyfd(fd, compact=True, txn=txn)
        return index, term

    def install_snapshot(self, path: str) -> None:
        """Replace the whole state with the LMDB image at `path`, atomically.

        Steps (a crash before step 4's rename leaves the old state, after it the
        new; leftovers are removed on the next open):
          1 copy   hard-link the image (fsynced when it was received) as
                   <root>/gen-N.tmp/data.mdb, or copy and fsync it where
                   it cannot be linked; the image is the live file from
                   then on, so the caller drops it from its store once the
                   log is reset (reconcile drops any left by a crash)
          2 verify open the copy, check it carries state machine metadata
          3 rename gen-N.tmp -> gen-N, fsync the root directory
          4 swap   symlink current.tmp -> gen-N, rename over `current`, fsync root
          5 reopen close the old environment, open the new one
          6 cleanup remove the old generation
        Installing an image older than what is applied is refused
        (SnapshotImageError): it would roll acknowledged writes back.
        """
        index, term, _ = read_image_meta(path)
        if index < self._applied_index:
            raise SnapshotImageError(
                f"snapshot at index {index} is older than applied index {self._applied_index}"
            )
        hook = self.testing_install_hook or (lambda step: None)
        with self._lifecycle:
            self._install(path, index, term, hook)

    def _install(self, path: str, index: int, term: int, hook: Callable[[str], None]) -> None:
        _remove_stale_generations(self._root)
        old_gen = os.readlink(os.path.join(self._root, _CURRENT))
        new_gen = f"{_GEN_PREFIX}{_max_generation(self._root) + 1:06d}"
        tmp_dir = os.path.join(self._root, new_gen + ".tmp")

        os.makedirs(tmp_dir)
        data = os.path.join(tmp_dir, "data.mdb")
        try:
            os.link(path, data)  # no copy: a follower catching up writes the image once
            with open(data, "rb") as linked:
                fsync_file(linked.fileno(), data)  # synced when received; a fault still stops here
        except FileExistsError:
            raise
        except OSError as e:
            if getattr(e, "operation", None):  # the fsync failed (StorageFault): fail-stop, no copy
                raise
            with open(path, "rb") as src, open(data, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                fsync_file(dst.fileno(), data)
        hook("copy")

        env = _open_env(tmp_dir, self._map_size, True)
        try:
            with env.begin() as txn:
                meta_db = env.open_db(b"meta", txn=txn, create=False)
                if _read_meta(txn, meta_db)[:2] != (index, term):
                    raise SnapshotImageError(f"{path}: image changed while installing")
        finally:
            env.close()
        fsync_dir(tmp_dir)
        hook("verify")

        os.rename(tmp_dir, os.path.join(self._root, new_gen))
        fsync_dir(self._root)
        hook("rename")

        _point_current(self._root, new_gen)
        hook("swap")

        self._end_streams()
        self._unpin()
        self._env.close()
        self._open_current()
        self.checkpoint()
        hook("reopen")

        shutil.rmtree(os.path.join(self._root, old_gen), ignore_errors=True)
        hook("cleanup")


class _ImageStream:
    """The read end of a pipe that a thread fills with env.copyfd(compact=True) from one read transaction."""

    def __init__(self, env: lmdb.Environment, txn: lmdb.Transaction, registry: set) -> None:
        self._env, self._txn, self._registry = env, txn, registry
        rfd, self._wfd = os.pipe()
        self._file = os.fdopen(rfd, "rb")
        self._thread = threading.Thread(target=self._copy, name="image-stream", daemon=True)
        self.error: BaseException | None = None
        self.members: MemberSet | None = None  # the member set the image holds (same transaction)

    def start(self) -> None:
        self._thread.start()

    def _copy(self) -> None:
        try:
            self._env.copyfd(self._wfd, compact=True, txn=self._txn)
        except BaseException as e:  # the reader closed early (EPIPE), or LMDB failed: read() sees EOF early
            self.error = e
        finally:
            os.close(self._wfd)

    def read(self, n: int) -> bytes:
        """Up to n bytes (fewer only at the end); raises if the copy failed before the end."""
        data = self._file.read(n)
        if len(data) < n:
            self._thread.join()
            if self.error is not None:
                raise SnapshotImageError(f"streaming the state machine image failed: {self.error!r}")
        return data

    def close(self) -> None:
        """Stop early or finish: the copy thread ends (EPIPE) and the read transaction is released."""
        self._file.close()
        self._thread.join()
        self._txn.abort()
        self._registry.discard(self)


def _point_current(root: str, gen: str) -> None:
    """Atomically make `root/current` a symlink to gen, durably."""
    tmp = os.path.join(root, _CURRENT + ".tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(gen, tmp)
    os.rename(tmp, os.path.join(root, _CURRENT))
    fsync_dir(root)


def _generations(root: str) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(_GEN_PREFIX)]


def _max_generation(root: str) -> int:
    nums = [int(n[len(_GEN_PREFIX):].split(".")[0]) for n in _generations(root)]
    return max(nums, default=0)


def _recover_after_os_crash(root: str) -> None:
    """Unsynced commits from another boot may be torn: roll back to the durable base, else discard."""
    current = os.path.join(root, _CURRENT)
    restored = None
    if os.path.lexists(current):
        gen_dir = os.path.realpath(current)
        try:
            restored = durable_base.restore(gen_dir)
            if restored is not None and read_image_meta(os.path.join(gen_dir, durable_base.DATA_FILE))[:2] != restored:
                raise durable_base.DurableBaseError("the restored file is not at the saved base")
        except (durable_base.DurableBaseError, SnapshotImageError, lmdb.Error, OSError) as e:
            log.warning("cannot restore the durable base in %s: %s", gen_dir, e)
            restored = None
    if restored is not None:
        log.warning("the state machine in %s has unsynced commits from an earlier boot or a run that "
                    "stopped on a storage fault (an OS crash, power loss or failed sync may have torn "
                    "them): rolled back to its durable base at index %d (term %d); the WAL replays the "
                    "rest", root, *restored)
    else:
        log.warning("the state machine in %s has unsynced commits from an earlier boot or a run that "
                    "stopped on a storage fault (an OS crash, power loss or failed sync may have torn "
                    "it) and no durable base: discarding it to rebuild from the newest snapshot and "
                    "the WAL", root)
        _discard_generations(root)
    guard.disarm(root)


def _discard_generations(root: str) -> None:
    """Remove the whole LMDB state (every generation and `current`), durably.

    `current` goes first: from then on the state is empty whatever is left of
    the generations (a crash half-way through the removal leaves some), and
    the next generation gets a name none of them had.
    """
    current = os.path.join(root, _CURRENT)
    if os.path.lexists(current):
        os.unlink(current)
    fsync_dir(root)
    for name in _generations(root):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    fsync_dir(root)


def _remove_stale_generations(root: str) -> None:
    """Remove half-installed or superseded generations (anything not current)."""
    live = os.readlink(os.path.join(root, _CURRENT))
    removed = False
    for name in _generations(root):
        if name != live:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed = True
    tmp = os.path.join(root, _CURRENT + ".tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
        removed = True
    if removed:
        fsync_dir(root)


def _range_leased(txn, hist, req: kv_pb2.RangeRequest, revision: int, resp: kv_pb2.RangeResponse,
                  leases: lease_store.LeaseStore | None) -> kv_pb2.RangeResponse:
    """_range, and with `leases` (some key has a lease) each KeyValue's lease too."""
    _range(txn, hist, req, revision, resp)
    if leases is not None and not req.count_only:
        leases.fill(txn, resp.kvs)
    return resp


def _range(txn, hist, req: kv_pb2.RangeRequest, revision: int, resp: kv_pb2.RangeResponse) -> kv_pb2.RangeResponse:
    """Fill resp (in place, so callers can hand in a slot of a larger message).

    txn's default db must be latest: py-lmdb parses keyword arguments slowly,
    so get and cursor are called without db=. A value is read from the key's
    history event in `hist` (history.py), and only when the answer has values.
    """
    resp.header.revision = revision
    key, range_end = req.key, req.range_end
    if not range_end:
        raw = txn.get(key)
        if raw is not None:
            resp.count = 1
            if not req.count_only:
                if req.keys_only:
                    keys.add_key_value(resp.kvs, key, raw, True)
                else:
                    keys.add_header_value(resp.kvs, key, raw, value_of(txn, hist, raw))
        return resp
    end = keys.range_end_bound(key, range_end)
    if end is not None and end <= key:
        return resp
    limit = req.limit
    cur = txn.cursor()
    if not cur.set_range(key):
        return resp
    count = 0
    if req.count_only:
        for k in cur.iternext(keys=True, values=False):
            if end is not None and k >= end:
                break
            count += 1
    else:
        keys_only, kvs = req.keys_only, resp.kvs
        add_key, add_value = keys.add_key_value, keys.add_header_value
        for k, raw in cur:
            if end is not None and k >= end:
                break
            count += 1
            if not limit or count <= limit:
                if keys_only:
                    add_key(kvs, k, raw, True)
                else:
                    add_value(kvs, k, raw, value_of(txn, hist, raw))
        resp.more = count > len(resp.kvs)
    resp.count = count
    return resp


def _run_checked(ex: _Executor, cmd: command_pb2.Command):
    """The command's result, or the ApplyError of an invalid command (nothing of which stays applied)."""
    try:
        return ex.run_command(cmd)
    except InvalidRequest as e:
        return ApplyError(e.code, str(e))


class _Executor:
    """Runs the ops of commands inside one write transaction, tracking revision."""

    def __init__(self, latest_db, hist_db, tombs_db, revision: int, leases: lease_store.LeaseStore):
        self.txn: lmdb.Transaction[bytes]  # the write transaction of the batch being applied, set by begin
        self._latest = latest_db
        self._hist_db = hist_db
        self._tombs_db = tombs_db
        self._leases = leases
        self.leased_keys = False  # some key has a lease: puts and deletes keep the lease tables (set by apply)
        self.has_lease: Callable[[bytes], bool]  # key -> whether it has a lease, in this batch (set by apply)
        self.revision = revision
        self._sub_rev = 0  # the revision whose writes self._sub numbers
        self._sub = 0
        self._txn_rev = 0  # revision shared by the writes of the txn being run
        self._txn_wrote = False
        # After run_command: the result is only plain put responses (see sessions.encode_answer).
        self.puts_only = False

    def begin(self, txn: lmdb.Transaction[bytes]) -> None:
        """Run the commands of this batch in `txn` (its default db is latest)."""
        self.txn = txn
        # The batch's history writes, written by flush_history in one call (putmulti): one
        # LMDB call per write cost ~1 us per put on every member. History only grows at its end.
        self.events: list[tuple[bytes, bytes]] = []  # (history key, event)
        # Deleted keys' chain heads (history.py): a put of a key absent from latest looks there.
        tombs = txn.cursor(db=self._tombs_db)
        self._tomb_at = tombs.set_key if tombs.first() else None  # None: no tombstone (yet) to look at
        self._tomb_cursor = tombs

    def flush_history(self) -> None:
        """Write the history of what ran so far (before anything reads it: a hash, a compaction step)."""
        if self.events:
            self.txn.cursor(db=self._hist_db).putmulti(self.events, append=True)
            self.events.clear()  # in place: run_command holds its append

    def _record(self, header: bytes) -> bytes:
        """The stored record (header + value) of the put whose header is in latest: from this
        batch's events when this batch made it (not yet written), else from history."""
        hkey, events = header[_WRITE_KEY], self.events
        if events and hkey >= events[0][0]:
            return history.record_in(events[bisect.bisect_left(events, (hkey,))][1])
        return record_of(self.txn, self._hist_db, header)

    def _chain_head(self, key: bytes, old: bytes | None) -> bytes:
        """The history key of key's newest write, which a new write's event names as prev."""
        if old is not None:
            return old[_WRITE_KEY]
        if self._tomb_at is not None and self._tomb_at(key):
            return self._tomb_cursor.value()
        return history.NO_PREV

    def _next_sub(self, rev: int) -> int:
        """The sub number of the next write at `rev` (it follows the writes of that revision)."""
        if rev == self._sub_rev:
            self._sub += 1
        else:
            self._sub_rev, self._sub = rev, 0
        return self._sub

    def run_command(self, cmd: command_pb2.Command) -> command_pb2.CommandResult | PlainPuts:
        """Run a command's ops, each answer built in place in the result.

        A top-level put (the bulk of any write load) is run inline: one
        revision of its own, no RequestOp/ResponseOp copies. A command of
        plain puts only (no prev_kv) gets no messages at all: its result is
        PlainPuts(n, revision). The messages of the plain puts before the
        first other op are built only when that op comes.

        Validation is optimistic (checking a whole command first cost ~1 us
        per put on every member): a put is checked as it runs, by the same
        rules as validation.check_op, and the first op of another kind has
        the whole command checked before it runs. An invalid command raises
        InvalidRequest after the puts it ran are undone.
        """
        get, put, pack, unpack = self.txn.get, self.txn.put, _RECORD_HEADER.pack, _RECORD_HEADER.unpack_from
        events = self.events.append
        put_heads, join, write_key = _PUT_HEADS, b"".join, _WRITE_KEY
        first = self.revision + 1
        plain = 0  # leading plain puts whose responses are not built
        result = responses = None
        puts_only = True
        undo: list | None = []  # (key, old record) of each put run; None once the command is known valid
        max_key = keys.MAX_KEY_BYTES
        has_lease = self.has_lease
        for op in cmd.ops:
            # Puts that neither attach a lease nor overwrite a key that has one run inline; the
            # rest (their lease bookkeeping) as any other op. An op that is no put reads as a put
            # of the empty key (protobuf's default), which no put may have: it, and a put that
            # does, go the general way (which refuses the latter).
            if (key := (req := op.request_put).key) and not (req.lease or self.leased_keys and has_lease(key)):
                if undo is not None and len(key) > max_key:
                    self._refuse(cmd, undo, first)
                self.revision = rev = self.revision + 1
                old = get(key)  # the transaction's default db is latest (see apply)
                if undo is not None:
                    undo.append((key, old))
                if old is None:
                    header = pack(rev, rev, 0, 1)
                    prev = _NO_PREV if self._tomb_at is None else self._chain_head(key, None)
                else:
                    create, _, _, version = unpack(old)
                    header = pack(create, rev, 0, version + 1)
                    prev = old[write_key]
                put(key, header)
                # A put of its own, the only write at its revision: its history key is (rev, 0), the
                # header's WRITE_KEY. The event as history.encode_put makes it.
                events((header[write_key], join((prev, put_heads[len(key)], key, header, req.value))))
                if responses is None:
                    if not req.prev_kv:
                        plain += 1
                        continue
                    result, responses = self._built(first, plain)
                out = responses.add()
                out.response_put.header.revision = rev
                if req.prev_kv and old is not None:
                    puts_only = False
                    out.response_put.prev_kv.CopyFrom(keys.to_key_value(key, self._record(old)))
                continue
            if undo is not None:
                try:
                    validation.check_command(cmd)
                    self._leases.check_puts(self.txn, cmd.ops)
                except InvalidRequest as e:
                    self._refuse(cmd, undo, first, e)
                undo = None
            if responses is None:
                result, responses = self._built(first, plain)
            puts_only = False
            self._run_op(op, responses.add())
        self.puts_only = puts_only
        if result is None:
            return PlainPuts(plain, self.revision)
        result.revision = self.revision
        return result

    def _refuse(self, cmd: command_pb2.Command, undo: list, first: int,
                error: InvalidRequest | None = None) -> NoReturn:
        """Undo the puts an invalid command ran (newest first) and raise what is wrong with it."""
        txn = self.txn
        for key, old in reversed(undo):
            if old is None:
                txn.delete(key)
            else:
                txn.put(key, old)
        if undo:  # their history is the last of the batch's, not yet written
            del self.events[-len(undo):]
        self.revision = first - 1
        if error is not None:
            raise error
        validation.check_command(cmd)  # raises, naming the problem
        raise InvalidRequest("invalid command")  # not reached: the same rules found it invalid

    @staticmethod
    def _built(first: int, plain: int):
        """A CommandResult holding the responses of `plain` puts from revision `first`, and its list."""
        result = command_pb2.CommandResult()
        responses = result.responses
        for rev in range(first, first + plain):
            responses.add().response_put.header.revision = rev
        return result, responses

    def run_internal_op(self, op: kv_pb2.RequestOp) -> kv_pb2.ResponseOp:
        """Run an op the cluster itself issues (a lease revoke's deletes) through the ordinary path."""
        out = kv_pb2.ResponseOp()
        self._run_op(op, out)
        return out

    def _write_revision(self) -> int:
        if self._txn_rev:
            self._txn_wrote = True
            return self._txn_rev
        self.revision += 1
        return self.revision

    def _run_op(self, op: kv_pb2.RequestOp, out: kv_pb2.ResponseOp) -> None:
        """Run any op (also inside a txn), filling `out`."""
        kind = op.WhichOneof("request")
        if kind == "request_put":
            self._put(op.request_put, out.response_put)
            out.response_put.header.revision = self.revision
        elif kind == "request_delete_range":
            self._delete(op.request_delete_range, out.response_delete_range)
            out.response_delete_range.header.revision = self.revision
        elif kind == "request_range":
            rev = self._txn_rev or self.revision
            self.flush_history()  # the values of keys this batch wrote are in its events
            _range_leased(self.txn, self._hist_db, op.request_range, rev, out.response_range,
                          self._leases if self.leased_keys else None)
        else:
            self._txn(op.request_txn, out.response_txn)

    def _put(self, req: kv_pb2.PutRequest, resp: kv_pb2.PutResponse) -> None:
        txn, key = self.txn, req.key
        old = txn.get(key, db=self._latest)
        rev = self._write_revision()
        sub = self._next_sub(rev)
        if old is None:
            create, version = rev, 1
        else:
            create, _, version = keys.decode_header(old)
            version += 1
            if req.prev_kv:
                resp.prev_kv.CopyFrom(keys.to_key_value(key, self._record(old)))
                if self.leased_keys:
                    resp.prev_kv.lease = self._leases.lease_of(txn, key)
        header = keys.encode_header(create, rev, version, sub)
        txn.put(key, header, db=self._latest)
        event = history.encode_put(key, header, req.value, self._chain_head(key, old), req.lease)
        self.events.append((_HIST_KEY(rev, sub), event))
        if req.lease or self.leased_keys:
            self._leases.attach(txn, key, req.lease)
            self.leased_keys = self.leased_keys or bool(req.lease)

    def _delete(self, req: kv_pb2.DeleteRangeRequest, resp: kv_pb2.DeleteRangeResponse) -> None:
        txn, key = self.txn, req.key
        doomed: list[tuple[bytes, bytes]] = []
        if not req.range_end:
            raw = txn.get(key, db=self._latest)
            if raw is not None:
                doomed.append((key, raw))
        else:
            end = keys.range_end_bound(key, req.range_end)
            if end is None or end > key:
                cur = txn.cursor(db=self._latest)
                if cur.set_range(key):
                    for k, raw in cur:
                        if end is not None and k >= end:
                            break
                        doomed.append((k, raw))
        if not doomed:
            return
        rev = self._write_revision()
        for k, raw in doomed:
            txn.delete(k, db=self._latest)
            sub = self._next_sub(rev)
            hkey = _HIST_KEY(rev, sub)
            self.events.append((hkey, history.encode_delete(k, rev, sub, raw[_WRITE_KEY])))
            txn.put(k, hkey, db=self._tombs_db)
            if req.prev_kv:
                prev = keys.to_key_value(k, self._record(raw))
                if self.leased_keys:
                    prev.lease = self._leases.lease_of(txn, k)
                resp.prev_kvs.append(prev)
            if self.leased_keys:
                self._leases.detach(txn, k)
        if self._tomb_at is None:  # a put that re-creates a key now looks for its tombstone
            self._tomb_at = self._tomb_cursor.set_key
        resp.deleted = len(doomed)

    def _compared(self, c: kv_pb2.Compare) -> bytes | None:
        """The record a compare looks at: the header, or for a value compare the whole record."""
        header = self.txn.get(c.key, db=self._latest)
        return self._record(header) if header is not None and c.target == _VALUE else header

    def _txn(self, req: kv_pb2.TxnRequest, resp: kv_pb2.TxnResponse) -> None:
        outer = self._txn_rev == 0
        if outer:
            self._txn_rev, self._txn_wrote = self.revision + 1, False
        ok = all(compare_holds(c, self._compared(c)) for c in req.compare)
        resp.succeeded = ok
        for op in req.success if ok else req.failure:
            self._run_op(op, resp.responses.add())
        if outer:
            if self._txn_wrote:
                self.revision = self._txn_rev
            self._txn_rev = 0
            _stamp_revision(resp, self.revision)


def _stamp_revision(txn_resp: kv_pb2.TxnResponse, revision: int) -> None:
    """Give the txn and every response nested in it the txn's final revision."""
    txn_resp.header.revision = revision
    for r in txn_resp.responses:
        kind = r.WhichOneof("response")
        if kind == "response_txn":
            _stamp_revision(r.response_txn, revision)
        else:
            getattr(r, kind).header.revision = revision
