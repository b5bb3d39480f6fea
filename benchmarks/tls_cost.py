"""What TLS costs: the same load on a plaintext and a TLS cluster, in alternating rounds.

Starts two local 3-node clusters (real processes, free ports): one plaintext,
one with client TLS (--client-cert-auth) and mutual peer TLS, certificates
from `kvstore certs init`. Each round runs, on each cluster in turn (the
order flips every round, so drift in machine load hits both alike):

- put throughput at 256 closed-loop clients, coalesced (`kvstore bench`'s load);
- single-client put latency (p50).

and prints every measured line, then the medians over rounds and the cost:
throughput lost (1 - tls/plain) and p50 added (tls/plain - 1). On a shared,
busy machine those swing with everyone else's load; the members' CPU per
put (user + system time of the three processes over the point, from /proc)
moves much less, and at saturation throughput is its inverse, so it is
printed too.

    .venv/bin/python benchmarks/tls_cost.py [--rounds 5] [--secs 8] [--json out.json]

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


async def interleaved_p50(clusters: dict[str, LocalCluster], windows: int, window_s: float = 1.0) -> dict[str, list]:
    """Per-window p50 (ms) of sequential single-client puts, the clusters taking turns each window."""
    from kvstore.client import AsyncClient

    value = os.urandom(256)
    out: dict[str, list] = {m: [] for m in clusters}
    clients = {m: AsyncClient(lc.endpoints, tls=lc.client_tls(), coalesce=False, timeout=10) for m, lc in clusters.items()}
    try:
        for c in clients.values():
            for _ in range(20):
                await c.put(b"warm", value)
        order = list(clusters)
        for w in range(windows):
            for mode in (order if w % 2 == 0 else order[::-1]):
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
    ap.add_argument("--json", default=None, help="write every measured point and the summary here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        d = certs.init(os.path.join(tmp, "certs"), nodes=3)
        clusters = {
            "plain": LocalCluster.with_free_ports(os.path.join(tmp, "plain")),
            "tls": LocalCluster.with_free_ports(os.path.join(tmp, "tls"), certs=d),
        }
        for lc in clusters.values():
            lc.start()
        try:
            for lc in clusters.values():
                lc.wait_for_leader(60)
            results: dict[str, dict[str, list]] = {m: {p: [] for p, _ in POINTS} for m in clusters}
            for r in range(args.rounds):
                order = ["plain", "tls"] if r % 2 == 0 else ["tls", "plain"]
                for mode in order:
                    lc = clusters[mode]
                    for point, clients in POINTS:
                        spec = LoadSpec(tuple(lc.endpoints), "put", clients, args.secs,
                                        args.procs if clients > 1 else 1, coalesce=True, tls=lc.client_tls())
                        cpu0 = members_cpu_s(lc)
                        s = run_load(spec)
                        s.extra["server_cpu_us_per_op"] = (members_cpu_s(lc) - cpu0) / max(1, s.ops) * 1e6
                        results[mode][point].append(s)
                        print(f"round {r + 1} {mode:<5} {point:<18} {format_line(s)} "
                              f"server_cpu={s.extra['server_cpu_us_per_op']:.0f}us/op", flush=True)
            windows = asyncio.run(interleaved_p50(clusters, args.windows))
        finally:
            for lc in clusters.values():
                lc.stop()

    def med(mode: str, point: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) if hasattr(s, attr) else s.extra[attr] for s in results[mode][point])

    tput = {m: med(m, "put x256 coalesced", "rate") for m in clusters}
    p50 = {m: med(m, "put x1", "p50") for m in clusters}
    cpu = {m: med(m, "put x256 coalesced", "server_cpu_us_per_op") for m in clusters}
    def paired(point: str, attr: str) -> float:
        """Median over rounds of tls/plain measured back to back (drift between rounds cancels)."""
        get = (lambda s: getattr(s, attr)) if attr in ("rate", "p50") else (lambda s: s.extra[attr])
        return statistics.median(get(t) / get(p) for t, p in zip(results["tls"][point], results["plain"][point]))

    summary = {
        "rounds": args.rounds, "secs": args.secs,
        "put256_rate_plain": tput["plain"], "put256_rate_tls": tput["tls"],
        "put256_throughput_cost": 1 - tput["tls"] / tput["plain"],
        "put1_p50_ms_plain": p50["plain"], "put1_p50_ms_tls": p50["tls"],
        "put1_p50_cost": p50["tls"] / p50["plain"] - 1,
        "put256_server_cpu_us_plain": cpu["plain"], "put256_server_cpu_us_tls": cpu["tls"],
        "put256_server_cpu_cost": cpu["tls"] / cpu["plain"] - 1,
        "paired_put256_throughput_cost": 1 - paired("put x256 coalesced", "rate"),
        "paired_put256_server_cpu_cost": paired("put x256 coalesced", "server_cpu_us_per_op") - 1,
        "paired_put1_p50_cost": paired("put x1", "p50") - 1,
        "windows": args.windows,
        "window_put1_p50_ms_plain": statistics.median(windows["plain"]),
        "window_put1_p50_ms_tls": statistics.median(windows["tls"]),
        "window_paired_put1_p50_cost": statistics.median(t / p for t, p in zip(windows["tls"], windows["plain"])) - 1,
    }
    print(f"\nmedians over {args.rounds} rounds of {args.secs:g}s:")
    print(f"  put x256 coalesced: plain {tput['plain']:,.0f}/s  tls {tput['tls']:,.0f}/s  "
          f"throughput cost {summary['put256_throughput_cost']:+.1%}")
    print(f"  put x256 members' CPU per put: plain {cpu['plain']:.1f} us  tls {cpu['tls']:.1f} us  "
          f"cost {summary['put256_server_cpu_cost']:+.1%}")
    print(f"  put x1 p50:         plain {p50['plain']:.2f} ms  tls {p50['tls']:.2f} ms  "
          f"latency cost {summary['put1_p50_cost']:+.1%}")
    print(f"  paired by round (median of tls/plain): throughput cost {summary['paired_put256_throughput_cost']:+.1%}, "
          f"members' CPU per put {summary['paired_put256_server_cpu_cost']:+.1%}, "
          f"single-client p50 {summary['paired_put1_p50_cost']:+.1%}")
    print(f"  single-client p50 in {args.windows} alternating 1 s windows: plain {summary['window_put1_p50_ms_plain']:.2f} ms"
          f"  tls {summary['window_put1_p50_ms_tls']:.2f} ms  paired cost {summary['window_paired_put1_p50_cost']:+.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary,
                       "points": {m: {p: [s.as_dict() for s in v] for p, v in pts.items()} for m, pts in results.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
