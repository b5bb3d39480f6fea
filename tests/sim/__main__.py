"""python -m tests.sim --seeds N [--start S] [--nodes 3|5|7] [--bug NAME] [--trace] [--jobs J]"""
from __future__ import annotations

import argparse
import sys

from kvstore.raft import faults

from .runner import default_jobs, run_range, run_seed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--nodes", type=int, choices=(3, 5, 7), default=None,
                    help="cluster size (default: 3, 5 or 7 by seed)")
    ap.add_argument("--ticks", type=int, default=120, help="ticks of chaos before the network heals")
    ap.add_argument("--bug", action="append", default=[], choices=faults.ALL, help="plant a bug (test the tests)")
    ap.add_argument("--trace", action="store_true", help="print every event (use with --seeds 1)")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default: KVSTORE_SIM_JOBS or CPUs)")
    ap.add_argument("--keep-going", action="store_true", help="don't stop at the first failing seed")
    a = ap.parse_args(argv)
    if a.trace:
        for seed in range(a.start, a.start + a.seeds):
            steps, rep = run_seed(seed, a.nodes, frozenset(a.bug), a.ticks, trace=True)
            print(rep or f"seed {seed}: ok ({steps} steps)")
            if rep:
                return 1
        return 0
    jobs = a.jobs or default_jobs()
    steps, failures, secs, cpu = run_range(a.start, a.seeds, a.nodes, frozenset(a.bug), a.ticks, jobs,
                                           stop_on_fail=not a.keep_going)
    for _, rep in failures[:3]:
        print(rep, file=sys.stderr)
    print(f"{a.seeds} seeds from {a.start}: {len(failures)} failing; {steps:,} steps in {secs:.1f}s wall, "
          f"{cpu:.1f}s cpu on {jobs} process(es): {steps / max(cpu, 1e-9):,.0f} steps per cpu-second")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
