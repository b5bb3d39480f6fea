#!/usr/bin/env python
"""Recovery figures: a follower catching up via snapshot, and a node restarting with its data.

On a local 3-node cluster (real processes, LocalCluster):

1. Baseline: kill -9 a follower while the store is empty, restart it, time to
   serving. This is the fixed cost (interpreter start, imports, gRPC bind)
   every restart pays, so the data-dependent part can be read off phase 3.
2. Catch-up: kill -9 that follower, write --gib GiB through the client while
   it is down (the leader snapshots and compacts its log meanwhile, so the
   follower can only come back through a snapshot), restart it, and time until
   it has applied everything the leader had committed. Reported in MiB/s of
   data missed (and of the follower's LMDB size after).
3. Restart with data: kill -9 the (now full) follower again, restart it, and
   time to serving: its first correct local read of the last key written, and
   the time until it has applied the leader's commit index again.

"Serving" means a serializable Range sent straight to that member (no client
redirects) returns the value last written. It is polled every 10 ms on a
channel whose reconnect backoff is 10-20 ms: gRPC's default (1 s, then x1.6
with jitter) would round every figure up to the next retry. Also reported:
the CPU seconds the restarted process had used when it first served (steadier
than wall time on a shared machine). Restarts are crashes (SIGKILL), the
worst case: nothing was flushed or handed over on the way down.

The nodes keep their compiled bytecode in <workdir>/pycache (written by the
first start), as an installed package has its .pyc files: with
PYTHONDONTWRITEBYTECODE set, every restart would otherwise compile the
kvstore sources again. --no-bytecode-cache measures that case.

    .venv/bin/python benchmarks/recovery_bench.py               # 1 GiB
    .venv/bin/python benchmarks/recovery_bench.py --gib 0.25    # quicker
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from kvstore.launcher import LocalCluster  # noqa: E402
from kvstore.v1 import kv_pb2, kv_pb2_grpc  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
POLL_S = 0.01
# gRPC waits 1 s (then 1.6 s, ...) before reconnecting after a refused connection; polling a restarting
# member through such a channel measures the backoff, not the member.
PROBE_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 10), ("grpc.min_reconnect_backoff_ms", 10),
                         ("grpc.max_reconnect_backoff_ms", 20)]

console = Console(width=None if sys.stdout.isatty() else 160)


def data_size(path: str) -> int:
    """Bytes on disk of every file under path (the member's WAL, LMDB and snapshots).

    Allocated blocks, not file sizes: the LMDB file is a sparse file as large
    as its map (MDB_WRITEMAP), and only what is allocated of it holds data.
    """
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


async def fill(endpoints: list[str], total_bytes: int, value_bytes: int, inflight: int) -> tuple[bytes, bytes, float]:
    """Write total_bytes of values under keys r00000000..; the last key, its value, seconds taken."""
    from kvstore.client import AsyncClient

    n = max(1, total_bytes // value_bytes)
    value = os.urandom(value_bytes)
    next_i = 0
    columns = (TextColumn("fill"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("fill", total=n * value_bytes)
        async with AsyncClient(endpoints, timeout=60.0) as kv:
            async def writer() -> None:
                nonlocal next_i
                while next_i < n:
                    i = next_i
                    next_i += 1
                    await kv.put(b"r%08d" % i, value)
                    progress.advance(task, value_bytes)

            t0 = time.monotonic()
            await asyncio.gather(*(writer() for _ in range(inflight)))
            last_value = os.urandom(value_bytes)  # a distinct last write: proves a member has it all
            await kv.put(b"r-last", last_value)
            took = time.monotonic() - t0
    return b"r-last", last_value, took


def serving(addr: str, key: bytes, value: bytes, timeout: float = 120.0) -> float:
    """Seconds until addr answers a local (serializable) read of key with value."""
    t0 = time.monotonic()
    with grpc.insecure_channel(addr, options=PROBE_CHANNEL_OPTIONS) as ch:
        stub = kv_pb2_grpc.KVStub(ch)
        req = kv_pb2.RangeRequest(key=key, serializable=True)
        while time.monotonic() - t0 < timeout:
            try:
                r = stub.Range(req, timeout=0.5)
                if r.kvs and r.kvs[0].value == value:
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            time.sleep(POLL_S)
    raise TimeoutError(f"{addr} not serving {key!r} within {timeout}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process pid has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def caught_up(cluster: LocalCluster, i: int, target: int, t0: float, timeout: float = 600.0) -> float:
    """Seconds since t0 until member i has applied index >= target."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        s = cluster.status(i, 0.5)
        if s is not None and s.applied_index >= target:
            return time.monotonic() - t0
        time.sleep(POLL_S)
    raise TimeoutError(f"member {i} did not reach applied index {target} within {timeout}s")


def restart_timed(cluster: LocalCluster, i: int, key: bytes, value: bytes) -> dict[str, float]:
    """kill -9 member i, start it again; seconds to serving key=value (wall, and CPU of the node) and to the
    leader's commit index."""
    cluster.kill(i)
    lead = cluster.wait_for_leader(30, exclude=i)
    target = cluster.status(lead).commit_index
    t0 = time.monotonic()
    cluster.start_node(i)
    serve = serving(cluster.client_addr(i), key, value)
    cpu = cpu_seconds(cluster.pid(i))
    applied = caught_up(cluster, i, target, t0)
    return {"serving_s": serve, "serving_cpu_s": cpu, "caught_up_s": applied}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="data the follower misses / a node holds (GiB)")
    ap.add_argument("--value-kib", type=int, default=64, help="value size of the fill (KiB)")
    ap.add_argument("--inflight", type=int, default=64, help="concurrent puts while filling")
    ap.add_argument("--snapshot-count", type=int, default=256,
                    help="node flag: applied entries between snapshots (low, so the log is compacted while the "
                         "follower is down and it must come back through a snapshot)")
    ap.add_argument("--snapshot-catchup-entries", type=int, default=64, help="node flag: entries kept after one")
    ap.add_argument("--node-args", default="", help="further flags for every node (quoted, space-separated)")
    ap.add_argument("--workdir", default=None, help="data dirs (default: a temp dir, removed afterwards)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the figures here as JSON")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="nodes compile their sources at every start if PYTHONDONTWRITEBYTECODE is set")
    a = ap.parse_args()

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="kvrecovery-"))
    node_args = ["--snapshot-count", str(a.snapshot_count),
                 "--snapshot-catchup-entries", str(a.snapshot_catchup_entries), *a.node_args.split()]
    env = dict(os.environ)
    if not a.no_bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    # Free ports: fixed ones collide with another run on a shared machine. No metrics endpoint (a node
    # serving one imports prometheus_client at start, which the restart figures would count).
    cluster = LocalCluster.with_free_ports(str(workdir / "kv"), 3, extra_args=node_args, env=env, metrics_addrs={})
    total = int(a.gib * GiB)
    out: dict = {"gib": a.gib, "value_kib": a.value_kib, "node_args": node_args,
                 "bytecode_cache": not a.no_bytecode_cache}
    try:
        cluster.start()
        lead = cluster.wait_for_leader(30)
        f = next(i for i in cluster.ids if i != lead)
        # A key every member has, so "serving" is checked the same way in all phases.
        key, value, _ = asyncio.run(fill(cluster.endpoints, 1, 1, 1))
        # Twice: the first restart also compiles what the first serving imports lazily (into the bytecode cache).
        restart_timed(cluster, f, key, value)
        base = restart_timed(cluster, f, key, value)
        out["baseline_empty_restart"] = base
        console.print(f"baseline (empty store): member {f} serving {base['serving_s']:.2f} s after start "
                      f"({base['serving_cpu_s']:.2f} s CPU)")

        cluster.kill(f)
        lead = cluster.wait_for_leader(30, exclude=f)
        console.print(f"member {f} down; writing {total / MiB:,.0f} MiB in {a.value_kib} KiB values")
        key, value, took = asyncio.run(fill([cluster.client_addr(i) for i in cluster.ids if i != f],
                                            total, a.value_kib * 1024, a.inflight))
        out["fill_mib_s"] = total / MiB / took
        console.print(f"filled at {out['fill_mib_s']:.1f} MiB/s (3 replicas' worth of writes, 2 up)")
        lead = cluster.wait_for_leader(30, exclude=f)
        ls = cluster.status(lead)
        out["leader_before_catchup"] = {"commit_index": ls.commit_index, "snapshot_index": ls.snapshot_index,
                                        "db_size": ls.db_size, "wal_size": ls.wal_size}
        t0 = time.monotonic()
        cluster.start_node(f)
        catch = caught_up(cluster, f, ls.commit_index, t0)
        fs = cluster.status(f)
        out["catchup"] = {"seconds": catch, "mib_s": total / MiB / catch, "db_mib_s": fs.db_size / MiB / catch,
                          "follower_snapshot_index": fs.snapshot_index, "follower_db_size": fs.db_size}
        console.print(f"catch-up of {total / MiB:,.0f} MiB: {catch:.2f} s = {out['catchup']['mib_s']:.0f} MiB/s")

        # Settle: let every member finish snapshots triggered by the catch-up before the restart timing.
        time.sleep(2.0)
        full = restart_timed(cluster, f, key, value)
        full["data_dir_bytes"] = data_size(cluster.data_dir(f))
        out["restart_with_data"] = full

        t = Table(title=f"recovery ({a.gib:g} GiB, {a.value_kib} KiB values; kill -9 restarts)")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_row("restart to serving, empty store (fixed cost)", f"{base['serving_s']:.2f} s")
        t.add_row("  node CPU used by then", f"{base['serving_cpu_s']:.2f} s")
        t.add_row(f"restart to serving, {full['data_dir_bytes'] / GiB:.2f} GiB on disk", f"{full['serving_s']:.2f} s")
        t.add_row("  node CPU used by then", f"{full['serving_cpu_s']:.2f} s")
        t.add_row("  ... to the leader's commit index", f"{full['caught_up_s']:.2f} s")
        t.add_row(f"follower catch-up of {total / MiB:,.0f} MiB missed", f"{catch:.2f} s")
        t.add_row("  catch-up rate (data missed)", f"{out['catchup']['mib_s']:.0f} MiB/s")
        t.add_row("  catch-up rate (follower LMDB size)", f"{out['catchup']['db_mib_s']:.0f} MiB/s")
        t.add_row("  leader snapshot index / commit index at restart",
                  f"{ls.snapshot_index} / {ls.commit_index}")
        t.add_row("fill rate through the client", f"{out['fill_mib_s']:.0f} MiB/s")
        console.print(t)
    finally:
        cluster.stop()
        if a.json_path:
            Path(a.json_path).write_text(json.dumps(out, indent=1))
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
