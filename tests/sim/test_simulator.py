"""The simulator in CI: many seeds must pass, and it must be deterministic.

KVSTORE_SIM_SEEDS sets how many seeds CI runs (default 3000, about 45 s of
CPU, 25 s on 2 idle cores); KVSTORE_SIM_JOBS the number of processes (default: all CPUs).
"""
from __future__ import annotations

import os

from kvstore.raft import faults

from .runner import default_jobs, run_range, run_seed
from .simulator import Simulation

CI_SEEDS = int(os.environ.get("KVSTORE_SIM_SEEDS", "3000"))


def test_ci_seed_range_is_safe_and_live():
    steps, failures, wall, cpu = run_range(0, CI_SEEDS, jobs=default_jobs())
    print(f"{CI_SEEDS} seeds, {steps} steps, {wall:.1f}s wall, {cpu:.1f}s cpu, {steps / max(cpu, 1e-9):,.0f} steps/cpu-s")
    assert not failures, "\n\n".join(rep for _, rep in failures[:3])
    assert steps > CI_SEEDS * 100  # the seeds really ran clusters, not empty loops


def test_each_cluster_size_runs_with_every_invariant_exercised():
    for n in (3, 5, 7):
        sim = Simulation(1000 + n, nodes=n).run()
        c = sim.checker
        assert len(c.leaders) >= 1 and c.max_committed > 0 and c.chain and c.read_issue
        assert sim.live_done


def test_the_seeds_crash_members_at_every_storage_step_and_restart_them():
    """Kills and power cuts inside WAL writes, between the steps of snapshot installs and at fsync
    errors happen in the CI seeds, and restarts repair what they left (reconcile)."""
    crashes: dict[str, int] = {}
    repairs = 0
    for seed in range(150):
        sim = Simulation(seed).run()
        for where, n in sim.crashes.items():
            crashes[where] = crashes.get(where, 0) + n
        repairs += sim.repairs
    for where in ("wal-fdatasync", "install-copy", "install-verify", "install-rename", "install-reopen",
                  "log-reset", "image-remove", "fail-stop", "kill", "power cut"):
        assert crashes.get(where, 0) > 0, (where, crashes)
    assert repairs > 0


def test_same_seed_same_run():
    a = Simulation(42).run()
    b = Simulation(42).run()
    assert a.steps == b.steps
    assert list(a.history) == list(b.history)
    assert a.checker.chain == b.checker.chain
    c = Simulation(43).run()
    assert list(c.history) != list(a.history)


def test_a_failure_reports_a_trace_and_the_replay_command():
    # a planted bug guarantees a failure to look at
    for seed in range(50):
        steps, rep = run_seed(seed, bugs=frozenset({faults.VOTE_WITHOUT_LOG_CHECK}))
        if rep is not None:
            break
    assert rep is not None
    assert f"python -m tests.sim --seeds 1 --start {seed} --bug vote_without_log_check --trace" in rep
    assert "last events:" in rep and "VIOLATION" in rep
    # and replaying that seed gives the same failure
    assert run_seed(seed, bugs=frozenset({faults.VOTE_WITHOUT_LOG_CHECK}))[1] == rep
