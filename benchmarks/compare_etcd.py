#!/usr/bin/env python
"""kvstore side by side with etcd, in one invocation on one machine.

Starts a local 3-node kvstore cluster (LocalCluster: real node processes) and
a local 3-node etcd (../shared/bench/etcd_cluster.sh), then for every op and
client count runs the same closed-loop load against both: etcd through
../shared/bench/etcd_load.py, kvstore through kvstore.bench (AsyncClient), with
the SAME number of load processes. kvstore is measured twice: with client
coalescing (the default) and without (one op per session-stream message, as
independent callers would send them), for honesty. The points are
interleaved (etcd, kvstore, kvstore one-op) so that machine
noise drifting over the run falls on all three alike: only ratios from one
run mean anything on a shared machine.

Then: peak RSS per node (VmHWM) for both, whether the kvstore leader's term
moved during the load (a spurious election), and failover for both with
default timing: kill -9 of the leader -> first acknowledged write at a client,
N trials, median and max.

    .venv/bin/python benchmarks/compare_etcd.py                 # full run
    .venv/bin/python benchmarks/compare_etcd.py --secs 5 --clients 1,256 --ops put
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: etcd's side (CI copies shared/ beside the clone); KVSTORE_SHARED_BENCH points elsewhere.
SHARED_BENCH = Path(os.environ.get("KVSTORE_SHARED_BENCH") or REPO.parent / "shared" / "bench")
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from kvstore.bench import LoadSpec, Stats, default_procs, format_line, run_points  # noqa: E402
from kvstore.launcher import LocalCluster  # noqa: E402

ETCD_ENDPOINTS = ("127.0.0.1:12379", "127.0.0.1:22379", "127.0.0.1:32379")
KV_BASE_CLIENT_PORT = 42379  # members on 42379, 42479, 42579 (peers +1)
KV_BASE_PEER_PORT = 42380
#: Failover probes: one attempt may hang on a dead leader's forwarded request,
#: so bound it; the same bound and pause for both systems.
PROBE_ATTEMPT_S = 0.2
PROBE_PAUSE_S = 0.02
PROBE_GIVE_UP_S = 30.0

#: Wide enough for the tables when the output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)


# --- etcd ---------------------------------------------------------------------


class Etcd:
    """The shared 3-node etcd: start/stop through etcd_cluster.sh, single-member restarts mirror its flags."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.script = SHARED_BENCH / "etcd_cluster.sh"
        self._stubs = None
        self._children: list[subprocess.Popen] = []  # members we restarted, reaped at stop()

    def start(self) -> None:
        subprocess.run(["bash", str(self.script), "start", str(self.dir)], check=True, timeout=60)

    def stop(self) -> None:
        subprocess.run(["bash", str(self.script), "stop", str(self.dir)], check=False, timeout=60)
        for p in self._children:
            p.poll()

    def pid(self, i: int) -> int:
        return int((self.dir / f"e{i}.pid").read_text().strip())

    def restart_member(self, i: int) -> None:
        """Start member i again on its existing data dir (the flags etcd_cluster.sh uses; no data wiped)."""
        cl = ",".join(f"e{j}=http://127.0.0.1:{j}2380" for j in (1, 2, 3))
        cmd = ["etcd", "--name", f"e{i}", "--data-dir", str(self.dir / f"e{i}.data"),
               "--listen-client-urls", f"http://127.0.0.1:{i}2379", "--advertise-client-urls", f"http://127.0.0.1:{i}2379",
               "--listen-peer-urls", f"http://127.0.0.1:{i}2380", "--initial-advertise-peer-urls", f"http://127.0.0.1:{i}2380",
               "--initial-cluster", cl, "--initial-cluster-token", "bench", "--initial-cluster-state", "new",
               "--log-level", "error"]
        with open(self.dir / f"e{i}.log", "ab") as log:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        (self.dir / f"e{i}.pid").write_text(f"{p.pid}\n")
        self._children.append(p)

    def status(self) -> list[dict]:
        """`etcdctl endpoint status` for every member that answers."""
        out = subprocess.run(
            ["etcdctl", f"--endpoints={','.join(ETCD_ENDPOINTS)}", "--command-timeout=1s", "endpoint", "status",
             "-w", "json"], env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True, timeout=10)
        try:
            return json.loads(out.stdout or "[]")
        except json.JSONDecodeError:
            return []

    def leader(self) -> int | None:
        """Index (1..3) of the member every answering member names as leader."""
        sts = self.status()
        ids = {s["Status"]["header"]["member_id"]: s["Endpoint"] for s in sts}
        leaders = {s["Status"]["leader"] for s in sts}
        if len(leaders) != 1:
            return None
        ep = ids.get(leaders.pop())
        return ETCD_ENDPOINTS.index(ep) + 1 if ep in ETCD_ENDPOINTS else None

    def wait_healthy(self, timeout: float = 30.0) -> int:
        """Until all three answer, agree on a leader and have applied the same index; the leader."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sts = self.status()
            if len(sts) == 3:
                applied = {s["Status"].get("raftAppliedIndex", s["Status"]["raftIndex"]) for s in sts}
                lead = self.leader()
                if lead is not None and max(applied) - min(applied) <= 2:
                    return lead
            time.sleep(0.1)
        raise TimeoutError("etcd cluster not healthy")

    def stubs(self):
        """etcd_min.proto stubs, generated the way etcd_load.py does it (one definition of the API)."""
        if self._stubs is None:
            sys.path.insert(0, str(SHARED_BENCH))
            import etcd_load

            self._stubs = etcd_load.stubs()
        return self._stubs


_LINE = re.compile(r"(\w+) ops=(\d+) rate=(\d+)/s p50=([\d.]+)ms p99=([\d.]+)ms clients=(\d+)")


def etcd_point(op: str, clients: int, procs: int, secs: float) -> Stats:
    """One point through etcd_load.py (a subprocess with this interpreter, as the README says)."""
    cmd = [sys.executable, str(SHARED_BENCH / "etcd_load.py"), "--target", ETCD_ENDPOINTS[0], "--op", op,
           "--procs", str(procs), "--conc", str(clients // procs), "--secs", str(secs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120)
    m = _LINE.search(out.stdout)
    if not m:
        raise RuntimeError(f"etcd_load.py printed no result: {out.stdout[-300:]} {out.stderr[-1000:]}")
    ops = int(m.group(2))
    return Stats(op, clients, procs, False, ops, 0, secs, float(m.group(3)), float(m.group(4)),
                 float(m.group(5)), float("nan"), extra={"line": m.group(0)})


# --- shared helpers -----------------------------------------------------------


def procs_for(clients: int, want: int) -> int:
    """The largest process count <= want that divides clients (etcd_load.py takes clients per process)."""
    p = max(1, min(want, clients))
    while clients % p:
        p -= 1
    return p


def peak_rss_kib(pid: int | None) -> int | None:
    """VmHWM: the most resident memory the process has ever had, in KiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# --- failover ---------------------------------------------------------------------


async def _etcd_probe(stubs, pb) -> float:
    """Round-robin puts over all members until one is acknowledged; seconds taken."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < PROBE_GIVE_UP_S:
        stub = stubs[i % len(stubs)]
        i += 1
        try:
            await stub.Put(pb.PutRequest(key=b"failover", value=b"x"), timeout=PROBE_ATTEMPT_S)
            return time.monotonic() - t0
        except Exception:
            await asyncio.sleep(PROBE_PAUSE_S)
    return float("inf")


def etcd_failover(etcd: Etcd, trials: int) -> list[float]:
    import grpc

    pb, rpc = etcd.stubs()
    times: list[float] = []

    async def run() -> None:
        chans = [grpc.aio.insecure_channel(ep, options=[("grpc.initial_reconnect_backoff_ms", 50),
                                                        ("grpc.max_reconnect_backoff_ms", 500)])
                 for ep in ETCD_ENDPOINTS]
        stubs = [rpc.KVStub(c) for c in chans]
        try:
            for n in range(trials):
                lead = etcd.wait_healthy()
                os.kill(etcd.pid(lead), signal.SIGKILL)
                t = await _etcd_probe(stubs, pb)
                times.append(t)
                console.print(f"  etcd trial {n + 1}/{trials}: killed e{lead}, first ack after {t * 1e3:.0f} ms")
                etcd.restart_member(lead)
        finally:
            for c in chans:
                await c.close()

    asyncio.run(run())
    etcd.wait_healthy()
    return times


def kv_wait_healthy(cluster: LocalCluster, timeout: float = 30.0) -> int:
    """Until every member answers, agrees on the leader and has applied within a few entries of the others."""
    def ok():
        sts = cluster.statuses(0.5)
        if any(s is None for s in sts.values()):
            return None
        leaders = {s.leader_id for s in sts.values()}
        applied = [s.applied_index for s in sts.values()]
        if len(leaders) == 1 and 0 not in leaders and max(applied) - min(applied) <= 2:
            return leaders.pop()
        return None
    return cluster.wait_for(ok, timeout, "kvstore cluster healthy")


def kv_failover(cluster: LocalCluster, trials: int) -> list[float]:
    from kvstore.client import AsyncClient, FixedInterval

    times: list[float] = []

    async def run() -> None:
        policy = FixedInterval(interval=PROBE_PAUSE_S, attempt_timeout=PROBE_ATTEMPT_S)
        async with AsyncClient(cluster.endpoints, coalesce=False, retry=policy, timeout=PROBE_GIVE_UP_S) as kv:
            for n in range(trials):
                lead = kv_wait_healthy(cluster)
                await kv.put(b"failover", b"x")  # the client knows the current leader, as a live client would
                os.kill(cluster.pid(lead), signal.SIGKILL)
                t0 = time.monotonic()
                try:
                    await kv.put(b"failover", b"x")
                    t = time.monotonic() - t0
                except Exception:
                    t = float("inf")
                times.append(t)
                console.print(f"  kvstore trial {n + 1}/{trials}: killed {lead}, first ack after {t * 1e3:.0f} ms")
                cluster.kill(lead)  # reap it
                cluster.start_node(lead)

    asyncio.run(run())
    kv_wait_healthy(cluster)
    return times


# --- the run ------------------------------------------------------------------------


@dataclass
class Row:
    etcd: Stats
    kv: Stats
    unary: Stats | None
    term_moved: int


def op_label(s: Stats) -> str:
    """The op, marked when the load came through the blocking Client's threads."""
    return s.op + (" (Client threads)" if s.extra.get("blocking") else "")


def print_table(rows: list[Row]) -> None:
    """Two tables: throughput with ratios, then latency with ratios (ratio = kvstore / etcd)."""
    t = Table(title="throughput, ops/s (same run, same load processes; ratio = kvstore / etcd)")
    for c in ("op", "clients", "procs"):
        t.add_column(c)
    for c in ("etcd", "kvstore", "ratio", "kv 1 op/msg", "1-op ratio", "errors", "term moved"):
        t.add_column(c, justify="right")
    for r in rows:
        u = r.unary
        t.add_row(
            op_label(r.kv), str(r.kv.clients), str(r.kv.procs), f"{r.etcd.rate:,.0f}", f"{r.kv.rate:,.0f}",
            fmt(ratio(r.kv.rate, r.etcd.rate)) + "x",
            f"{u.rate:,.0f}" if u else "-", (fmt(ratio(u.rate, r.etcd.rate)) + "x") if u else "-",
            str(r.kv.errors + (u.errors if u else 0)), str(r.term_moved),
        )
    console.print(t)
    t = Table(title="latency, ms (etcd_load.py reports no p99.9)")
    for c in ("op", "clients"):
        t.add_column(c)
    for c in ("etcd p50", "kv p50", "p50 ratio", "etcd p99", "kv p99", "p99 ratio", "kv p99.9",
              "1-op p50", "1-op p99"):
        t.add_column(c, justify="right")
    for r in rows:
        u = r.unary
        t.add_row(
            op_label(r.kv), str(r.kv.clients), fmt(r.etcd.p50), fmt(r.kv.p50), fmt(ratio(r.kv.p50, r.etcd.p50)),
            fmt(r.etcd.p99), fmt(r.kv.p99), fmt(ratio(r.kv.p99, r.etcd.p99)), fmt(r.kv.p999),
            fmt(u.p50) if u else "-", fmt(u.p99) if u else "-",
        )
    console.print(t)


def goal_lines(rows: list[Row], rss_ratio: float | None, failover_ratio: float | None,
               full_load: tuple[float, int] | None = None, blocking: Row | None = None,
               blocking_async: Stats | None = None) -> list[str]:
    """The performance goals, each with the figure this run measured (absent points are skipped)."""
    by = {(r.kv.op, r.kv.clients): r for r in rows}
    out = []

    def add(name: str, value: float, ok: bool) -> None:
        out.append(f"{'PASS' if ok else 'MISS'}  {name}: {fmt(value)}")

    for op, goal in (("put", 5), ("get", 8), ("sget", 8)):
        r = by.get((op, 256))
        if r:
            v = ratio(r.kv.rate, r.etcd.rate)
            add(f"{op} throughput at 256 clients >= {goal}x etcd", v, v >= goal)
    for op in ("put", "get"):
        r = by.get((op, 1))
        if r:
            v = ratio(r.kv.p50, r.etcd.p50)
            add(f"single-client {op} p50 <= etcd's (ratio)", v, v <= 1)
    unary = [ratio(r.unary.rate, r.etcd.rate) for r in rows if r.unary and r.kv.clients == 256]
    if unary:
        add("coalescing off at 256 clients: worst throughput ratio >= 1.0x etcd", min(unary), min(unary) >= 1.0)
    if blocking is not None:
        v = ratio(blocking.kv.rate, blocking.etcd.rate)
        add(f"blocking Client, {blocking.kv.clients} threads, put throughput >= 2x etcd", v, v >= 2)
        if blocking_async is not None:
            out[-1] += (f"   (AsyncClient, the same {blocking.kv.clients} callers as coroutines: "
                        f"{fmt(ratio(blocking_async.rate, blocking.etcd.rate))})")
    moved = sum(r.term_moved for r in rows)
    out.append(f"{'PASS' if moved == 0 else 'MISS'}  no leader election during the load: term moved {moved}")
    if full_load is not None:
        secs, moved = full_load
        out.append(f"{'PASS' if moved == 0 else 'MISS'}  no leader election during {secs:.0f} s of puts at 256 "
                   f"clients: term moved {moved}")
    if rss_ratio is not None:
        add("peak RSS per node <= 1.5x etcd's (ratio of the max)", rss_ratio, rss_ratio <= 1.5)
    if failover_ratio is not None:
        add("failover median <= etcd's (ratio)", failover_ratio, failover_ratio <= 1)
    return out


def kv_term(cluster: LocalCluster) -> int:
    sts = [s for s in cluster.statuses(1.0).values() if s is not None]
    return max((s.term for s in sts), default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=float, default=10.0, help="measured seconds per point")
    ap.add_argument("--ops", default="put,get,sget", help="comma-separated: put, get, sget")
    ap.add_argument("--clients", default="1,16,128,256", help="comma-separated client counts")
    ap.add_argument("--procs", type=int, default=default_procs(), help="load processes (same for both systems)")
    ap.add_argument("--no-unary", action="store_true", help="skip the kvstore runs with coalescing off")
    ap.add_argument("--transport", choices=("stream", "unary"), default="stream",
                    help="how kvstore's client carries calls (the library's default: stream)")
    ap.add_argument("--blocking-clients", type=int, default=64,
                    help="puts from this many threads sharing one blocking Client per load process, "
                         "next to etcd at the same client count (0 skips)")
    ap.add_argument("--failover-trials", type=int, default=20, help="0 skips failover")
    ap.add_argument("--full-load-secs", type=float, default=60.0,
                    help="kvstore puts at 256 clients for this long, watching for a leader election (0 skips)")
    ap.add_argument("--node-args", default="", help="extra flags for every kvstore node (quoted, space-separated)")
    ap.add_argument("--workdir", default=None, help="data dirs (default: a temp dir, removed afterwards)")
    ap.add_argument("--json", dest="json_path", default=None, help="write every figure here as JSON")
    a = ap.parse_args()
    missing = [tool for tool in ("etcd", "etcdctl") if shutil.which(tool) is None]
    if missing:
        print(f"compare_etcd: {' and '.join(missing)} not found: install Debian's etcd-server and etcd-client "
              "(`make system-deps` does, as root)", file=sys.stderr)
        return 2
    if not (SHARED_BENCH / "etcd_cluster.sh").is_file():
        print(f"compare_etcd: {SHARED_BENCH}/etcd_cluster.sh not found (the shared bench scripts sit beside "
              "the checkout)", file=sys.stderr)
        return 2

    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    clients = [int(c) for c in a.clients.split(",") if c.strip()]
    if not set(ops) <= {"put", "get", "sget"}:
        ap.error("etcd_load.py knows put, get and sget only")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="kvbench-"))
    etcd = Etcd(workdir / "etcd")
    cluster = LocalCluster(str(workdir / "kv"), 3, KV_BASE_CLIENT_PORT, KV_BASE_PEER_PORT,
                           extra_args=a.node_args.split())
    report: dict = {"secs": a.secs, "procs": a.procs, "points": []}
    try:
        console.print(f"starting etcd and kvstore clusters in {workdir}; "
                      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        report["loadavg_start"] = os.getloadavg()
        etcd.start()
        cluster.start()
        cluster.wait_for_leader(30)
        kv_wait_healthy(cluster)
        etcd.wait_healthy()
        rows: list[Row] = []
        for op in ops:
            for n in clients:
                procs = procs_for(n, a.procs)
                e = etcd_point(op, n, procs, a.secs)
                console.print(f"etcd    {e.extra['line']}")
                term0 = kv_term(cluster)
                spec = LoadSpec(tuple(cluster.endpoints), op, n, a.secs, procs, transport=a.transport)
                kv = run_points([spec], console)[0]
                console.print(f"kvstore {format_line(kv)}")
                u = None
                if not a.no_unary:
                    u = run_points([LoadSpec(tuple(cluster.endpoints), op, n, a.secs, procs, coalesce=False,
                                              transport=a.transport)],
                                   console)[0]
                    console.print(f"1-op    {format_line(u)}")
                rows.append(Row(e, kv, u, kv_term(cluster) - term0))
                report["points"].append({"etcd": e.as_dict(), "kvstore": kv.as_dict(),
                                         "unary": u.as_dict() if u else None, "term_moved": rows[-1].term_moved})
        blocking = None
        blocking_async = None
        if a.blocking_clients > 0:
            n = a.blocking_clients
            procs = procs_for(n, a.procs)
            e = etcd_point("put", n, procs, a.secs)
            console.print(f"etcd    {e.extra['line']}")
            term0 = kv_term(cluster)
            kb = run_points([LoadSpec(tuple(cluster.endpoints), "put", n, a.secs, procs, transport=a.transport,
                                      blocking=True)], console)[0]
            console.print(f"Client  {format_line(kb)} (blocking Client, one thread per client)")
            # The same callers as coroutines on an AsyncClient: the threads' hand-off can only cost on top.
            ka = run_points([LoadSpec(tuple(cluster.endpoints), "put", n, a.secs, procs, transport=a.transport)],
                            console)[0]
            console.print(f"Async   {format_line(ka)} (the same callers as coroutines: the blocking Client's ceiling)")
            blocking = Row(e, kb, None, kv_term(cluster) - term0)
            blocking_async = ka
            report["blocking"] = {"etcd": e.as_dict(), "kvstore": kb.as_dict(), "async_client": ka.as_dict(),
                                  "term_moved": blocking.term_moved}
        print_table(rows + ([blocking] if blocking else []))
        report["loadavg_end"] = os.getloadavg()
        console.print(f"load average now {os.getloadavg()[0]:.1f} (a busy machine starves both sides, not equally: "
                      "compare ratios between runs with care)")

        rss = Table(title="peak RSS per node (VmHWM, MiB)")
        rss.add_column("system")
        for i in (1, 2, 3):
            rss.add_column(f"node {i}", justify="right")
        rss.add_column("max", justify="right")
        e_rss = [peak_rss_kib(etcd.pid(i)) for i in (1, 2, 3)]
        k_rss = [peak_rss_kib(cluster.pid(i)) for i in (1, 2, 3)]
        for name, vals in (("etcd", e_rss), ("kvstore", k_rss)):
            rss.add_row(name, *[fmt((v or 0) / 1024, ".0f") for v in vals], fmt(max(v or 0 for v in vals) / 1024, ".0f"))
        console.print(rss)
        rss_ratio = ratio(max(v or 0 for v in k_rss), max(v or 0 for v in e_rss))
        console.print(f"peak RSS ratio (max node, kvstore / etcd): {rss_ratio:.2f}")
        report["rss_kib"] = {"etcd": e_rss, "kvstore": k_rss}
        # after the RSS reading: etcd gets no such run, so it must not count in the comparison
        full_load = None
        if a.full_load_secs > 0:
            term0 = kv_term(cluster)
            spec = LoadSpec(tuple(cluster.endpoints), "put", 256, a.full_load_secs, procs_for(256, a.procs))
            kv = run_points([spec], console)[0]
            full_load = (a.full_load_secs, kv_term(cluster) - term0)
            console.print(f"full load {format_line(kv)} term moved {full_load[1]}")
            report["full_load"] = {"kvstore": kv.as_dict(), "term_moved": full_load[1]}
        failover_ratio = None

        if a.failover_trials > 0:
            console.print(f"failover: kill -9 of the leader -> first acknowledged write ({a.failover_trials} trials each)")
            ef = etcd_failover(etcd, a.failover_trials)
            kf = kv_failover(cluster, a.failover_trials)
            ft = Table(title="failover, ms (kill -9 leader -> first acked write)")
            for c in ("system", "median", "max", "min"):
                ft.add_column(c, justify="right")
            for name, ts in (("etcd", ef), ("kvstore", kf)):
                ft.add_row(name, fmt(statistics.median(ts) * 1e3, ".0f"), fmt(max(ts) * 1e3, ".0f"),
                           fmt(min(ts) * 1e3, ".0f"))
            console.print(ft)
            failover_ratio = ratio(statistics.median(kf), statistics.median(ef))
            console.print(f"failover median ratio (kvstore / etcd): {failover_ratio:.2f}")
            report["failover_s"] = {"etcd": ef, "kvstore": kf}
        console.print("goals:")
        for line in goal_lines(rows, rss_ratio, failover_ratio, full_load, blocking, blocking_async):
            console.print("  " + line)
    finally:
        cluster.stop()
        etcd.stop()
        if a.json_path:
            Path(a.json_path).write_text(json.dumps(report, indent=1, default=str))
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
