"""The simulator has teeth: each planted bug is caught within the CI seed budget.

Each bug is switched on by name (kvstore/raft/faults.py): the protocol's
through Config.testing_bugs, the node's in the server's own Ready handler
and reconcile, which the simulator drives. The simulator must report a
violation, by name of the property the bug breaks, somewhere in the first
KVSTORE_SIM_SEEDS seeds.
"""
from __future__ import annotations

import os

import pytest

from kvstore.raft import faults

from .runner import default_jobs, run_range

BUDGET = int(os.environ.get("KVSTORE_SIM_SEEDS", "3000"))

EXPECTED = {
    faults.COMMIT_OLD_TERM: ("not safe", "leader completeness", "state machine safety"),
    faults.VOTE_WITHOUT_LOG_CHECK: ("leader completeness", "not safe", "state machine safety", "log matching"),
    faults.VOTE_BEFORE_PERSIST: ("election safety", "log matching"),
    faults.READ_WITHOUT_HEARTBEAT: ("stale read",),
    # or removals in flight together leave no voter at all (seed 225: voters [] and learners [4])
    faults.TWO_CONF_CHANGES_IN_FLIGHT: ("not safe", "leader completeness", "state machine safety", "election safety",
                                        "liveness"),
    faults.LEARNER_IN_QUORUM: ("not safe", "leader completeness", "state machine safety"),
    faults.APPLY_BEFORE_DURABLE: ("not durable in its own log",),
    # or a member that acked entries it then lost on a crash is never caught up again (its match stays)
    faults.ACK_BEFORE_FSYNC: ("answered before durable on a majority", "not safe", "leader completeness",
                              "state machine safety", "log matching", "liveness"),
    faults.RECONCILE_WITHOUT_TERM_CHECK: ("state machine safety",),
    faults.FSYNC_ERROR_NOT_FATAL: ("log matching", "not safe", "answered before durable on a majority",
                                   "not durable in its own log",
                                   "leader completeness", "state machine safety"),
}


@pytest.mark.parametrize("bug", faults.ALL)
def test_planted_bug_is_caught(bug):
    found = None
    step = 200
    for start in range(0, BUDGET, step):  # in order, so the first catch is the smallest seed
        _, failures, _, _ = run_range(start, min(step, BUDGET - start), bugs=frozenset({bug}),
                                      jobs=default_jobs())  # whole chunk: report the smallest seed
        if failures:
            found = failures[0]
            break
    assert found is not None, f"planted bug {bug} not caught in {BUDGET} seeds"
    seed, report = found
    print(f"{bug}: caught at seed {seed}")
    assert any(word in report for word in EXPECTED[bug]), report
    assert f"--bug {bug}" in report


def test_without_planted_bugs_the_same_seeds_pass():
    _, failures, _, _ = run_range(0, 60, jobs=default_jobs())
    assert not failures, failures[0][1]


def test_answers_are_checked_on_their_own(monkeypatch):
    """Without the commit-time check (committed means safe), the check made as each client is
    answered (durable on a majority) still catches acks sent before the fsync."""
    from .invariants import Checker
    from .runner import run_seed

    monkeypatch.setattr(Checker, "check_electable", lambda self, k, term: None)
    for seed in range(100):
        _, report = run_seed(seed, bugs=frozenset({faults.ACK_BEFORE_FSYNC}))
        if report is not None:
            break
    assert report is not None and "answered before durable on a majority" in report, report
