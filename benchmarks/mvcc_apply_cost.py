"""What MVCC costs the apply path: CPU per put, this tree vs another, in CPU time.

Each tree applies the same entries (Batch commands of 64 256-byte puts over
100k keys, 2 client sessions: the shape `kvstore bench` makes) to a fresh
unsynced state machine (a node's default) in a child process, timed with
time.process_time, so other load on a shared machine disturbs it far less
than a wall-clock rate. Each tree runs --repeats times, alternating; the
minimum per tree is its cost. Every member applies every put, so the
difference, times three, is what MVCC adds to a 3-node cluster's CPU per put:
compare it with the node CPU per put `mvcc_cost.py` reports.

    python benchmarks/mvcc_apply_cost.py --base-tree /tmp/base [--repeats 5] [--entries 3000]
    python benchmarks/mvcc_apply_cost.py --base-tree /tmp/base --instructions --entries 800
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)

CHILD = r"""
import os, random, shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))  # its apply_bench puts its own tree first
from apply_bench import make_entries
import kvstore
assert kvstore.__file__.startswith(sys.argv[1]), (kvstore.__file__, sys.argv[1])
from kvstore.storage.state_machine import StateMachine
n, per_apply = int(sys.argv[2]), 16
apply = len(sys.argv) < 4 or sys.argv[3] == "1"
datas = make_entries(n, 64, True, random.Random(42), 2)
path = tempfile.mkdtemp()
sm = StateMachine.open(path + "/sm", 8 << 30, fsync=False)
t0 = time.process_time()
for i in range(0, n if apply else 0, per_apply):
    sm.apply([(i + j + 1, 1, datas[i + j]) for j in range(per_apply)])
cpu = time.process_time() - t0
sm.close()
shutil.rmtree(path)
print(cpu / (n * 64) * 1e6)
"""


def instructions(tree: str, entries: int, apply: bool) -> int:
    """Instructions the child executes (valgrind's callgrind: exact, whatever else the machine runs)."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                          CHILD, tree, str(entries), "1" if apply else "0"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=tree), check=True, cwd=tree)
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))


def count_instructions(base_tree: str, entries: int) -> None:
    """Instructions per applied put, each tree: (with the apply - without it) / puts."""
    puts = entries * 64
    per_put = {}
    for name, tree in (("base", base_tree), ("mvcc", TREE)):
        per_put[name] = (instructions(tree, entries, True) - instructions(tree, entries, False)) / puts
        print(f"{name:>4}: {per_put[name]:,.0f} instructions per applied put", flush=True)
    extra = per_put["mvcc"] - per_put["base"]
    print(f"MVCC adds {extra:,.0f} instructions per put per member ({100 * extra / per_put['base']:+.0f}% of the "
          "apply path)")


def run(tree: str, entries: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, tree, str(entries)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=tree), check=True, cwd=tree)
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-tree", required=True, help="a built checkout of the commit to compare with")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--entries", type=int, default=3000, help="Batch entries of 64 puts applied per run")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions under valgrind instead (noise-free; ~2 min at --entries 800)")
    args = ap.parse_args()
    args.base_tree = os.path.abspath(args.base_tree)
    if args.instructions:
        count_instructions(args.base_tree, args.entries)
        return
    costs: dict[str, list[float]] = {"base": [], "mvcc": []}
    for r in range(args.repeats):
        for name in (("base", "mvcc") if r % 2 == 0 else ("mvcc", "base")):
            us = run(args.base_tree if name == "base" else TREE, args.entries)
            costs[name].append(us)
            print(f"run {r + 1} {name:>4}: {us:.2f} us CPU per applied put", flush=True)
    base, mvcc = min(costs["base"]), min(costs["mvcc"])
    paired = statistics.median(m - b for m, b in zip(costs["mvcc"], costs["base"]))
    print(f"apply CPU per put (min of {args.repeats}): base {base:.2f} us, mvcc {mvcc:.2f} us, "
          f"+{mvcc - base:.2f} us per member, +{3 * (mvcc - base):.2f} us per put on a 3-node cluster")
    print(f"median of the paired differences: {paired:+.2f} us per member, {3 * paired:+.2f} us per put "
          "on a 3-node cluster")


if __name__ == "__main__":
    main()
