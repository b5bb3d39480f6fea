"""What MVCC history costs: put throughput at 256 clients, this tree vs another, same run.

Two local 3-node clusters run side by side, one from this tree (every write
also goes to the history database) and one from --base-tree,
a built checkout of the commit before MVCC. Rounds alternate between them
(A B, then B A, ...) so drift in the machine's load hits both; each round is
one `kvstore bench` point (closed-loop puts, 256-byte values, 100k keys).
Prints each round and the medians of the put rate and of the CPU the three
node processes spent per put (from /proc), which a shared machine's other
load disturbs less than the rate.

    git archive <base-commit> | tar -x -C /tmp/base
    (cd /tmp/base && ../path/to/.venv/bin/python setup.py -q build_proto build_ext --inplace)
    python benchmarks/mvcc_cost.py --base-tree /tmp/base [--rounds 6] [--secs 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from metrics_overhead import ab_clusters, cluster_cpu_s

from kvstore.bench import LoadSpec, run_load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-tree", required=True, help="a built checkout of the commit to compare with")
    ap.add_argument("--rounds", type=int, default=6, help="measured points per cluster")
    ap.add_argument("--secs", type=float, default=8.0, help="seconds per point")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--procs", type=int, default=2, help="load-generating processes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kv-mvcc-ab-") as d:
        base, new = ab_clusters(args.base_tree, d, "mvcc")
        clusters = {"base": base, "mvcc": new}
        for lc in clusters.values():
            lc.start()
        try:
            for lc in clusters.values():
                lc.wait_for_leader(60)
                run_load(LoadSpec(tuple(lc.endpoints), "put", args.clients, 2.0, args.procs))  # warm up
            rates: dict[str, list[float]] = {name: [] for name in clusters}
            cpu_us: dict[str, list[float]] = {name: [] for name in clusters}
            for r in range(args.rounds):
                for name in (list(clusters) if r % 2 == 0 else list(reversed(clusters))):
                    lc = clusters[name]
                    cpu0 = cluster_cpu_s(lc)
                    s = run_load(LoadSpec(tuple(lc.endpoints), "put", args.clients, args.secs, args.procs))
                    cpu = (cluster_cpu_s(lc) - cpu0) / max(1, s.ops) * 1e6
                    rates[name].append(s.rate)
                    cpu_us[name].append(cpu)
                    print(f"round {r + 1} {name:>5}: {s.rate:>9,.0f} puts/s  p50 {s.p50:.1f} ms  p99 {s.p99:.1f} ms"
                          f"  {cpu:.1f} us CPU/put (3 nodes)  errors {s.errors}", flush=True)
            med = {name: statistics.median(v) for name, v in rates.items()}
            cpu_med = {name: statistics.median(v) for name, v in cpu_us.items()}
            print(f"median put rate at {args.clients} clients: base {med['base']:,.0f}/s, mvcc {med['mvcc']:,.0f}/s")
            print(f"median node CPU per put: base {cpu_med['base']:.1f} us, mvcc {cpu_med['mvcc']:.1f} us")
            print(f"MVCC cost: {100 * (med['base'] - med['mvcc']) / med['base']:+.1f}% of put throughput, "
                  f"{100 * (cpu_med['mvcc'] - cpu_med['base']) / cpu_med['base']:+.1f}% CPU per put")
        finally:
            for lc in clusters.values():
                lc.stop()


if __name__ == "__main__":
    main()
