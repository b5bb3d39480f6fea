"""What the metrics cost: put throughput at 256 clients, this tree vs another, same run.

Two local 3-node clusters run side by side: one from this tree with its HTTP
endpoints on (and /metrics scraped from every member every --scrape-every
seconds, as Prometheus would), one from --base-tree, a built checkout of the
commit to compare with (e.g. the one before the metrics). Rounds alternate
between them (A B, then B A, ...) so that drift in the machine's load hits
both; each round is one `kvstore bench` point (closed-loop puts, 256-byte
values). Prints every round and the medians: puts/s, and the CPU the three
node processes spent per put (from /proc), which other load on a shared
machine disturbs far less than the rate.

On a shared machine both swing by tens of percent from round to round, more
than the metrics cost. So it then also accounts for the cost directly: it
times each hook the metrics add (in this process, many thousand calls),
counts how often each ran per put on the leader during one more load point
(from the leader's own /metrics), and divides their sum by the leader's CPU
per put in that point.

    git archive <base-commit> | tar -x -C /tmp/base
    (cd /tmp/base && ../path/to/.venv/bin/python setup.py -q build_proto build_ext --inplace)
    python benchmarks/metrics_overhead.py --base-tree /tmp/base [--rounds 6] [--secs 8]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import timeit
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.bench import LoadSpec, run_load
from kvstore.launcher import LocalCluster


class TreeCluster(LocalCluster):
    """A LocalCluster whose nodes run the code of another source tree.

    The nodes start in that tree: `python -m` puts the working directory first
    on sys.path, so started from this checkout they would import this code."""

    def __init__(self, tree: str, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.tree = os.path.abspath(tree)

    def command(self, i: int) -> list[str]:
        return ["env", "-C", self.tree, f"PYTHONPATH={self.tree}", *super().command(i)]


def ab_clusters(base_tree: str, workdir: str, new_name: str, base_metrics: bool = True
                ) -> tuple[LocalCluster, LocalCluster]:
    """Two 3-member clusters on free ports under workdir: the base tree's code, and this checkout's."""
    extra = {} if base_metrics else {"metrics_addrs": {}}
    free = LocalCluster.with_free_ports(os.path.join(workdir, "base"), **extra)
    base = TreeCluster(base_tree, free.base_dir, 3, client_addrs=free.client_addrs, peer_addrs=free.peer_addrs)
    return base, LocalCluster.with_free_ports(os.path.join(workdir, new_name))


def cluster_cpu_s(lc: LocalCluster) -> float:
    """User + system CPU seconds the cluster's node processes have used so far."""
    total = 0
    for i in lc.ids:
        with open(f"/proc/{lc.pid(i)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(lc: LocalCluster, i: int) -> dict[str, float]:
    """Member i's samples: 'name{labels}' -> value."""
    with urllib.request.urlopen(lc.metrics_url(i), timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)}


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def hook_costs_us() -> dict[str, float]:
    """Microseconds per call of each hook the metrics put on the write path, timed here."""
    from kvstore.raft.types import MessageType
    from kvstore.server.kv_service import handles_errors
    from kvstore.server.metrics import DISK_BUCKETS, FastHistogram

    n = 200_000
    out: dict[str, float] = {}
    h = FastHistogram(DISK_BUCKETS)
    clock = time.monotonic
    box = [0]

    def timed_call():  # what _append/_timed_apply add around the call: two clock reads and an observe
        t0 = clock()
        box[0] = t0
        h.observe(clock() - t0)

    out["per fsync or apply batch (2 clock reads + histogram)"] = timeit.timeit(timed_call, number=n) / n * 1e6

    class Plain:
        async def Put(self, request, context):
            return request

    class Wrapped:
        @handles_errors
        async def Put(self, request, context):
            return request

    async def calls(obj, k):
        for _ in range(k):
            await obj.Put(1, None)

    def loop_time(obj):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            asyncio.run(calls(obj, n))
            best = min(best, time.perf_counter() - t0)
        return best

    out["per RPC (timing + count by method and code)"] = (loop_time(Wrapped()) - loop_time(Plain())) / n * 1e6
    hb = MessageType.HEARTBEAT
    msg_type = MessageType.APPEND
    out["per peer message (heartbeat check)"] = max(0.0, timeit.timeit(lambda: msg_type == hb, number=n) / n * 1e6
                                                    - timeit.timeit(lambda: None, number=n) / n * 1e6)
    counts = {"write": 0, "read": 0, "invalid": 0}

    def batch_counts():
        counts["write"] += 64
        counts["read"] += 0
        counts["invalid"] += 0

    out["per Batch RPC (op counts)"] = timeit.timeit(batch_counts, number=n) / n * 1e6
    received: dict[int, int] = {}

    def frame():
        received[2] = received.get(2, 0) + 100
        box[0] += 100

    out["per peer frame (bytes sent or received)"] = timeit.timeit(frame, number=n) / n * 1e6
    return out


def account(lc: LocalCluster, clients: int, secs: float, procs: int) -> None:
    """Hook costs x how often each ran per put on the leader, against the leader's CPU per put."""
    leader = lc.wait_for_leader(30)
    before, cpu0 = scrape(lc, leader), process_cpu_s(lc.pid(leader))
    s = run_load(LoadSpec(tuple(lc.endpoints), "put", clients, secs, procs))
    after, cpu1 = scrape(lc, leader), process_cpu_s(lc.pid(leader))
    puts = s.ops

    def per_put(prefix: str) -> float:
        return (total(after, prefix) - total(before, prefix)) / max(1, puts)

    rpcs = per_put("kvstore_grpc_server_handled_total")
    batches = per_put('kvstore_grpc_server_handled_total{grpc_code="OK",grpc_method="Batch"')
    fsyncs = per_put("kvstore_disk_wal_fsync_duration_seconds_count")
    applies = per_put("kvstore_disk_backend_commit_duration_seconds_count")
    frames_in = per_put("kvstore_network_peer_received_bytes_total")  # bytes; frames counted below
    costs = hook_costs_us()
    # Frames and messages to peers: about one frame per follower per Ready, i.e. per fsync batch or
    # ack batch; count both directions generously as 4 per fsync, each carrying at most a few messages.
    frames = 4 * fsyncs
    used = {
        "per fsync or apply batch (2 clock reads + histogram)": fsyncs + applies,
        "per RPC (timing + count by method and code)": rpcs,
        "per Batch RPC (op counts)": batches,
        "per peer frame (bytes sent or received)": frames,
        "per peer message (heartbeat check)": 3 * frames,
    }
    leader_cpu_us = (cpu1 - cpu0) / max(1, puts) * 1e6
    added = sum(costs[k] * used[k] for k in used)
    print(f"\nhook accounting on the leader, {puts:,} puts at {clients} clients ({s.rate:,.0f}/s):")
    print(f"  per put: {rpcs:.4f} RPCs ({batches:.4f} Batch), {fsyncs:.4f} WAL appends, {applies:.4f} apply "
          f"batches, {frames_in:.1f} peer bytes received")
    for k in used:
        print(f"  {k}: {costs[k]:.3f} us x {used[k]:.3f} per put = {costs[k] * used[k]:.3f} us")
    print(f"  added: {added:.3f} us per put of the leader's {leader_cpu_us:.1f} us CPU per put "
          f"= {100 * added / leader_cpu_us:.2f}%")


def scrape_while(lc: LocalCluster, every: float, stop: threading.Event, counts: list[int]) -> None:
    while not stop.wait(every):
        for i in lc.ids:
            with urllib.request.urlopen(lc.metrics_url(i), timeout=5) as r:
                r.read()
            counts[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-tree", required=True, help="a built checkout of the commit to compare with")
    ap.add_argument("--rounds", type=int, default=6, help="measured points per cluster")
    ap.add_argument("--secs", type=float, default=8.0, help="seconds per point")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--procs", type=int, default=2, help="load-generating processes")
    ap.add_argument("--scrape-every", type=float, default=5.0, help="seconds between scrapes of every member")
    ap.add_argument("--account-only", action="store_true", help="skip the A/B rounds; only the hook accounting")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kv-metrics-ab-") as d:
        base, new = ab_clusters(args.base_tree, d, "new", base_metrics=False)
        clusters = {"base": base, "metrics": new}
        for lc in clusters.values():
            lc.start()
        try:
            for lc in clusters.values():
                lc.wait_for_leader(60)
                run_load(LoadSpec(tuple(lc.endpoints), "put", args.clients, 2.0, args.procs))  # warm up
            if args.account_only:
                account(new, args.clients, args.secs, args.procs)
                return
            rates: dict[str, list[float]] = {name: [] for name in clusters}
            cpu_us: dict[str, list[float]] = {name: [] for name in clusters}
            scrapes = [0]
            for r in range(args.rounds):
                order = list(clusters) if r % 2 == 0 else list(reversed(clusters))
                for name in order:
                    lc = clusters[name]
                    stop = threading.Event()
                    scraper = None
                    if lc.metrics_addrs:
                        scraper = threading.Thread(target=scrape_while, args=(lc, args.scrape_every, stop, scrapes))
                        scraper.start()
                    cpu0 = cluster_cpu_s(lc)
                    s = run_load(LoadSpec(tuple(lc.endpoints), "put", args.clients, args.secs, args.procs))
                    cpu = (cluster_cpu_s(lc) - cpu0) / max(1, s.ops) * 1e6
                    stop.set()
                    if scraper is not None:
                        scraper.join()
                    rates[name].append(s.rate)
                    cpu_us[name].append(cpu)
                    print(f"round {r + 1} {name:>8}: {s.rate:>9,.0f} puts/s  p50 {s.p50:.1f} ms  "
                          f"p99 {s.p99:.1f} ms  {cpu:.1f} us CPU/put (3 nodes)  errors {s.errors}", flush=True)
            med = {name: statistics.median(v) for name, v in rates.items()}
            cpu_med = {name: statistics.median(v) for name, v in cpu_us.items()}
            print(f"median put rate at {args.clients} clients: base {med['base']:,.0f}/s, "
                  f"with metrics {med['metrics']:,.0f}/s ({scrapes[0]} scrapes)")
            print(f"median node CPU per put: base {cpu_med['base']:.1f} us, with metrics {cpu_med['metrics']:.1f} us")
            print(f"metrics overhead: {100 * (med['base'] - med['metrics']) / med['base']:+.1f}% of put throughput, "
                  f"{100 * (cpu_med['metrics'] - cpu_med['base']) / cpu_med['base']:+.1f}% CPU per put")
            account(new, args.clients, args.secs, args.procs)
        finally:
            for lc in clusters.values():
                lc.stop()


if __name__ == "__main__":
    main()
