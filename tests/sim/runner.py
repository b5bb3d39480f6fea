"""Run seed ranges, report failures with a trace and the command that replays them."""
from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager

from .simulator import Simulation, format_record
from .invariants import Violation


def replay_command(seed: int, nodes: int | None, bugs, chaos_ticks: int) -> str:
    cmd = f"python -m tests.sim --seeds 1 --start {seed}"
    if nodes is not None:
        cmd += f" --nodes {nodes}"
    if chaos_ticks != 120:
        cmd += f" --ticks {chaos_ticks}"
    for b in sorted(bugs):
        cmd += f" --bug {b}"
    return cmd + " --trace"


@contextmanager
def _quiet_server_logs():
    """The server's code logs what it repairs and installs; in a simulation that is noise."""
    logger = logging.getLogger("kvstore")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_seed(seed: int, nodes: int | None = None, bugs=frozenset(), chaos_ticks: int = 120,
             trace: bool = False) -> tuple[int, str | None]:
    """(steps, None) on success; (steps, report) on a violation or crash of the core."""
    with _quiet_server_logs():
        return _run_seed(seed, nodes, bugs, chaos_ticks, trace)


def _run_seed(seed: int, nodes: int | None, bugs, chaos_ticks: int, trace: bool) -> tuple[int, str | None]:
    sim = None
    try:
        sim = Simulation(seed, nodes=nodes, bugs=frozenset(bugs), chaos_ticks=chaos_ticks, trace=trace)
        sim.run()
        return sim.steps, None
    except Violation as v:
        kind = "VIOLATION"
        err = str(v)
        sim = sim or v.sim
    except Exception:  # an assertion or bug inside the core is a failure too
        kind = "EXCEPTION"
        err = traceback.format_exc()
    lines = [f"seed {seed}: {kind}: {err}"]
    if sim is not None:
        lines += [f"  params: {sim.p.describe()}", "  last events:"]
        lines += ["    " + format_record(r) for r in list(sim.history)[-60:]]
    lines.append(f"  replay: {replay_command(seed, nodes, bugs, chaos_ticks)}")
    return (sim.steps if sim is not None else 0), "\n".join(lines)


def _worker(args):
    start, stop, nodes, bugs, chaos_ticks, stop_on_fail = args
    cpu0 = time.process_time()
    steps = 0
    failures = []
    for seed in range(start, stop):
        s, rep = run_seed(seed, nodes, bugs, chaos_ticks)
        steps += s
        if rep is not None:
            failures.append((seed, rep))
            if stop_on_fail:
                break
    return steps, failures, time.process_time() - cpu0


def run_range(start: int, count: int, nodes: int | None = None, bugs=frozenset(), chaos_ticks: int = 120,
              jobs: int = 1, stop_on_fail: bool = False):
    """Run seeds [start, start+count) on `jobs` processes.

    Returns (steps, failures, wall seconds, cpu seconds); failures are (seed, report), sorted.
    """
    t0 = time.perf_counter()
    if jobs <= 1:
        steps, failures, cpu = _worker((start, start + count, nodes, bugs, chaos_ticks, stop_on_fail))
    else:
        import multiprocessing as mp
        chunk = max(1, min(50, count // (jobs * 4) or 1))
        tasks = [(s, min(s + chunk, start + count), nodes, bugs, chaos_ticks, stop_on_fail)
                 for s in range(start, start + count, chunk)]
        steps, failures, cpu = 0, [], 0.0
        with mp.get_context("fork").Pool(jobs) as pool:
            for s, f, c in pool.imap_unordered(_worker, tasks):
                steps += s
                cpu += c
                failures.extend(f)
                if failures and stop_on_fail:
                    pool.terminate()
                    break
        failures.sort()
    return steps, failures, time.perf_counter() - t0, cpu


def default_jobs() -> int:
    return int(os.environ.get("KVSTORE_SIM_JOBS", os.cpu_count() or 1))
