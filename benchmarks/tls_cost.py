"""What TLS and auth cost: the same load on a plaintext, a TLS and a TLS+auth cluster, in alternating rounds.

Starts three local 3-node clusters (real processes, free ports): one
plaintext, one with client TLS (--client-cert-auth) and mutual peer TLS,
certificates from `kvstore certs init`, and one with TLS and auth enabled,
where the load runs as a user (not root) whose role grants readwrite on the
load's keys, so every request carries a token and every op is checked. Each
round runs, on each cluster in turn (the order rotates every round, so drift
in machine load hits all alike):

- put throughput at 256 closed-loop clients, coalesced (`kvstore bench`'s load);
- single-client put latency (p50).

and prints every measured line, then the medians over rounds and the cost of
each mode against plain: throughput lost (1 - mode/plain) and p50 added
(mode/plain - 1). On a shared, busy machine those swing with everyone else's
load; the members' CPU per put (user + system time of the three processes
over the point, from /proc) moves much less, and at saturation throughput is
its inverse, so it is printed too.

    .venv/bin/python benchmarks/tls_cost.py [--rounds 5] [--secs 8] [--json out.json] [--modes plain,tls,tls+auth]

Last, single-client latency again in short alternating windows (`--windows`
of 1 s each, one client per cluster in this process): drift in machine load
over a 1 s window is small, so the per-window paired p50 ratio is the
steadiest latency figure on a shared machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore import certs
from kvstore.bench import LoadSpec, default_procs, format_line, run_load
from kvstore.launcher import LocalCluster

POINTS = (("put x256 coalesced", 256), ("put x1", 1))
TICKS = os.sysconf("SC_CLK_TCK")


def members_cpu_s(lc: LocalCluster) -> float:
    """User + system CPU seconds the cluster's member processes have used so far."""
    total = 0
    for i in lc.ids:
        with open(f"/proc/{lc.pid(i)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


#: The user the tls+auth load runs as, and its password.
LOAD_USER = ("load", "load-pw")
MODES = ("plain", "tls", "tls+auth")


def enable_auth(lc: LocalCluster) -> None:
    """root, and a user whose role may read and write the load's keys (k00000000.., warm) and nothing else."""
    from kvstore.client import Client

    with Client(lc.endpoints, tls=lc.client_tls(), timeout=30) as c:
        c.user_add("root", "root-pw")
        c.role_add("load")
        c.role_grant_permission("load", "readwrite", "k", prefix=True)
        c.role_grant_permission("load", "readwrite", "warm")
        c.user_add(*LOAD_USER)
        c.user_grant_role(LOAD_USER[0], "load")
        c.auth_enable()


def credentials(mode: str) -> dict[str, str]:
    return dict(zip(("user", "password"), LOAD_USER)) if mode == "tls+auth" else {}


async def interleaved_p50(clusters: dict[str, LocalCluster], windows: int, window_s: float = 1.0) -> dict[str, list]:
    """Per-window p50 (ms) of sequential single-client puts, the clusters taking turns each window."""
    from kvstore.client import AsyncClient

    value = os.urandom(256)
    out: dict[str, list] = {m: [] for m in clusters}
    clients = {m: AsyncClient(lc.endpoints, tls=lc.client_tls(), coalesce=False, timeout=10, **credentials(m))
               for m, lc in clusters.items()}
    try:
        for c in clients.values():
            for _ in range(20):
                await c.put(b"warm", value)
        order = list(clusters)
        for w in range(windows):
            for mode in order[w % len(order):] + order[:w % len(order)]:
                lat = []
                end = time.perf_counter() + window_s
                k = 0
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    await clients[mode].put(b"k%08d" % k, value)
                    lat.append(time.perf_counter() - t)
                    k += 1
                out[mode].append(statistics.median(lat) * 1e3)
    finally:
        for c in clients.values():
            await c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=float, default=8.0, help="measured seconds per point")
    ap.add_argument("--procs", type=int, default=default_procs(), help="load processes at 256 clients")
    ap.add_argument("--windows", type=int, default=60, help="1 s single-client windows per cluster, alternating")
    ap.add_argument("--modes", default=",".join(MODES), help=f"which clusters, plain first (of {', '.join(MODES)})")
    ap.add_argument("--json", default=None, help="write every measured point and the summary here")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if modes[0] != "plain" or not set(modes) <= set(MODES) or len(modes) < 2:
        ap.error(f"--modes: plain first, then one or more of {', '.join(MODES[1:])}")

    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        d = certs.init(os.path.join(tmp, "certs"), nodes=3)
        clusters = {m: LocalCluster.with_free_ports(os.path.join(tmp, m), certs=None if m == "plain" else d)
                    for m in modes}
        for lc in clusters.values():
            lc.start()
        try:
            for m, lc in clusters.items():
                lc.wait_for_leader(60)
                if m == "tls+auth":
                    enable_auth(lc)
            results: dict[str, dict[str, list]] = {m: {p: [] for p, _ in POINTS} for m in clusters}
            for r in range(args.rounds):
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                for mode in order:
                    lc = clusters[mode]
                    for point, clients in POINTS:
                        spec = LoadSpec(tuple(lc.endpoints), "put", clients, args.secs,
                                        args.procs if clients > 1 else 1, coalesce=True, tls=lc.client_tls(),
                                        **credentials(mode))
                        cpu0 = members_cpu_s(lc)
                        s = run_load(spec)
                        s.extra["server_cpu_us_per_op"] = (members_cpu_s(lc) - cpu0) / max(1, s.ops) * 1e6
                        results[mode][point].append(s)
                        print(f"round {r + 1} {mode:<8} {point:<18} {format_line(s)} "
                              f"server_cpu={s.extra['server_cpu_us_per_op']:.0f}us/op", flush=True)
            windows = asyncio.run(interleaved_p50(clusters, args.windows))
        finally:
            for lc in clusters.values():
                lc.stop()

    def value(s, attr: str) -> float:
        return getattr(s, attr) if attr in ("rate", "p50") else s.extra[attr]

    def med(mode: str, point: str, attr: str) -> float:
        return statistics.median(value(s, attr) for s in results[mode][point])

    def paired(mode: str, point: str, attr: str) -> float:
        """Median over rounds of mode/plain measured in the same round (drift between rounds cancels)."""
        return statistics.median(value(t, attr) / value(p, attr)
                                 for t, p in zip(results[mode][point], results["plain"][point]))

    T, L = "put x256 coalesced", "put x1"
    summary: dict[str, float | int] = {"rounds": args.rounds, "secs": args.secs, "windows": args.windows}
    for m in modes:
        summary[f"put256_rate_{m}"] = med(m, T, "rate")
        summary[f"put256_server_cpu_us_{m}"] = med(m, T, "server_cpu_us_per_op")
        summary[f"put1_p50_ms_{m}"] = med(m, L, "p50")
        summary[f"window_put1_p50_ms_{m}"] = statistics.median(windows[m])
    print(f"\nmedians over {args.rounds} rounds of {args.secs:g}s (cost against plain):")
    for m in modes[1:]:
        summary[f"put256_throughput_cost_{m}"] = 1 - summary[f"put256_rate_{m}"] / summary["put256_rate_plain"]
        summary[f"put1_p50_cost_{m}"] = summary[f"put1_p50_ms_{m}"] / summary["put1_p50_ms_plain"] - 1
        summary[f"paired_put256_throughput_cost_{m}"] = 1 - paired(m, T, "rate")
        summary[f"paired_put256_server_cpu_cost_{m}"] = paired(m, T, "server_cpu_us_per_op") - 1
        summary[f"paired_put1_p50_cost_{m}"] = paired(m, L, "p50") - 1
        summary[f"window_paired_put1_p50_cost_{m}"] = statistics.median(
            t / p for t, p in zip(windows[m], windows["plain"])) - 1
        print(f"  {m}:")
        print(f"    put x256 coalesced: plain {summary['put256_rate_plain']:,.0f}/s  {m} "
              f"{summary[f'put256_rate_{m}']:,.0f}/s  throughput cost {summary[f'put256_throughput_cost_{m}']:+.1%}")
        print(f"    put x256 members' CPU per put: plain {summary['put256_server_cpu_us_plain']:.1f} us  {m} "
              f"{summary[f'put256_server_cpu_us_{m}']:.1f} us")
        print(f"    put x1 p50: plain {summary['put1_p50_ms_plain']:.2f} ms  {m} {summary[f'put1_p50_ms_{m}']:.2f} ms  "
              f"latency cost {summary[f'put1_p50_cost_{m}']:+.1%}")
        print(f"    paired by round: throughput cost {summary[f'paired_put256_throughput_cost_{m}']:+.1%}, "
              f"members' CPU per put {summary[f'paired_put256_server_cpu_cost_{m}']:+.1%}, "
              f"single-client p50 {summary[f'paired_put1_p50_cost_{m}']:+.1%}")
        print(f"    single-client p50 in {args.windows} rotating 1 s windows: plain "
              f"{summary['window_put1_p50_ms_plain']:.2f} ms  {m} {summary[f'window_put1_p50_ms_{m}']:.2f} ms  "
              f"paired cost {summary[f'window_paired_put1_p50_cost_{m}']:+.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary,
                       "points": {m: {p: [s.as_dict() for s in v] for p, v in pts.items()} for m, pts in results.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
