"""Planted bugs: test-only switches that prove the simulator has teeth.

Each name here, when put in `Config.testing_bugs`, disables one safety rule
of the protocol. They are per-node (not global) so parallel tests cannot
leak them into each other, and all are off by default. tests/sim/test_planted_bugs.py
asserts the simulator catches every one of them within the CI seed budget.
"""
from __future__ import annotations

# Raft paper §5.4.2 / Figure 8: commit an entry from an earlier term by counting replicas.
COMMIT_OLD_TERM = "commit_old_term"
# §5.4.1: grant a vote without checking that the candidate's log is at least as up-to-date.
VOTE_WITHOUT_LOG_CHECK = "vote_without_log_check"
# Persist before you promise: send the vote response before the vote is durable.
VOTE_BEFORE_PERSIST = "vote_before_persist"
# Thesis §6.4: answer ReadIndex without confirming leadership by a heartbeat round.
READ_WITHOUT_HEARTBEAT = "read_without_heartbeat"

# The node's Ready handler and storage (kvstore/server/ready_handler.py, kvstore/storage/reconcile.py):
# apply committed entries before this Ready's write has made them durable locally.
APPLY_BEFORE_DURABLE = "apply_before_durable"
# send the acks (Ready.persisted_messages) with the other messages, before the fsync: the leader
# then counts a follower's copy that is not durable yet, and answers before a majority holds it.
ACK_BEFORE_FSYNC = "ack_before_fsync"
# on restart, take the log as continuing from the state machine without comparing terms.
RECONCILE_WITHOUT_TERM_CHECK = "reconcile_without_term_check"
# log a failed WAL fsync and carry on, as if the entries were durable.
FSYNC_ERROR_NOT_FATAL = "fsync_error_not_fatal"

PROTOCOL = (COMMIT_OLD_TERM, VOTE_WITHOUT_LOG_CHECK, VOTE_BEFORE_PERSIST, READ_WITHOUT_HEARTBEAT)
NODE = (APPLY_BEFORE_DURABLE, ACK_BEFORE_FSYNC, RECONCILE_WITHOUT_TERM_CHECK, FSYNC_ERROR_NOT_FATAL)
ALL = PROTOCOL + NODE


def check(bugs: frozenset[str] | set[str]) -> frozenset[str]:
    unknown = set(bugs) - set(ALL)
    if unknown:
        raise ValueError(f"unknown planted bug(s): {sorted(unknown)}")
    return frozenset(bugs)
