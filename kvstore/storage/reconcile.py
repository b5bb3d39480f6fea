"""Start-up repair of the gap a crash can leave between the Raft log and the state machine.

Invariant on start (what RawNode and WAL replay rely on): the state machine's
(applied index, applied term) is an entry the log holds, its base included:

    log.first_index() - 1 <= applied <= log.last_index()  and  log.term(applied) == applied term

Then the log continues from the state machine, raft restarts with
commit >= applied over an entry of the right term, and replay applies the
rest. Committed entries never change in a log, so in normal running the
invariant holds by itself; only these crashes break it:

  * an install of a received snapshot (state machine first, then the log
    reset) interrupted between its steps: the state machine is at the
    snapshot while the log, maybe holding a stale uncommitted tail of another
    term, is not;
  * a snapshot received and published, not yet installed, then a crash;
  * the state machine discarded by the boot guard after an OS crash, or
    rolled back to its last synced state: it is behind the log's base.

A snapshot's content is committed state (a leader only sends what is
committed, and a local one is what was applied), so installing the newest
one is always safe, provided the log is reset to it whenever it does not
hold the snapshot's entry with the snapshot's term.
"""
from __future__ import annotations

import logging

from kvstore.raft import faults
from kvstore.raft.storage import CompactedError, UnavailableError
from kvstore.raft.types import ConfState, SnapshotMetadata

from .raft_log import RaftLog
from .snapshot import SnapshotStore
from .state_machine import StateMachine

log = logging.getLogger("kvstore.storage")


class ReconcileError(Exception):
    """The log and the state machine cannot be brought together from what is on disk."""


def log_holds(raft_log: RaftLog, index: int, term: int, bugs: frozenset[str] = frozenset()) -> bool:
    """Whether the log holds entry `index` (or its base is at it) with `term`."""
    if not raft_log.first_index() - 1 <= index <= raft_log.last_index():
        return False
    if faults.RECONCILE_WITHOUT_TERM_CHECK in bugs:
        return True  # TESTING: a stale entry of another term passes for the applied one
    try:
        return raft_log.term(index) == term
    except (CompactedError, UnavailableError):
        return False


def reconcile(sm: StateMachine, raft_log: RaftLog, snapshots: SnapshotStore, bugs: frozenset[str] = frozenset()) -> None:
    """Bring the log and the state machine together (see the module docstring); ReconcileError if impossible.

    `bugs`: planted bugs (kvstore/raft/faults.py), for the simulator's tests only."""
    latest = snapshots.latest()
    if latest is not None and latest[0] > sm.applied_index:
        index, term, voters, path = latest
        log.warning("state machine at applied index %d is behind snapshot %d; reinstalling it",
                    sm.applied_index, index)
        sm.install_snapshot(path)
    applied, applied_term = sm.applied_index, sm.applied_term
    if not log_holds(raft_log, applied, applied_term, bugs):
        _finish_install(raft_log, snapshots, applied, applied_term)
    # Images the state machine covers are of no more use (an installed one is the live file now).
    snapshots.remove_through(applied)


def _finish_install(raft_log: RaftLog, snapshots: SnapshotStore, applied: int, applied_term: int) -> None:
    """The state machine is at a snapshot the log does not continue from: reset the log to it."""
    for index, term, voters, _path in reversed(snapshots.list()):
        if (index, term) == (applied, applied_term):
            log.warning("finishing an interrupted snapshot install at index %d term %d: the log "
                        "(entries %d..%d) is reset to it", index, term, raft_log.first_index(),
                        raft_log.last_index())
            raft_log.apply_snapshot(SnapshotMetadata(index=index, term=term, conf_state=ConfState(voters=list(voters))))
            return
    raise ReconcileError(
        f"state machine applied index {applied} (term {applied_term}) is not in the log "
        f"(entries {raft_log.first_index()}..{raft_log.last_index()}) and no snapshot at it exists")
