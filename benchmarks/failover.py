"""Failover time, kvstore and etcd in one run: kill -9 of the leader -> the first acknowledged write.

Starts a real 3-node kvstore cluster (free ports, a temporary directory) and,
when etcd is installed, the shared local 3-node etcd
(../shared/bench/etcd_cluster.sh). Each trial kills the leader of one system
with SIGKILL and times, from the kill, a client's write until one is
acknowledged; the killed member is restarted and the next trial waits until
the cluster is whole again. Trials alternate between the two systems so that
machine noise falls on both alike.

The probe is compare_etcd.py's, so the figures are comparable with its
failover table: etcd is probed round-robin over all members, kvstore through
the client library (no coalescing, which has learnt the leader from a write
just before the kill), both with the same attempt timeout and pause between
attempts. Both systems run with the same timing: 100 ms heartbeat, 1 s
election timeout (randomized up to 2x), which is the floor.

    .venv/bin/python benchmarks/failover.py [--trials 20] [--no-etcd] [--trace]

`--trace` prints, for every kvstore trial, a timeline in milliseconds after
the kill: the members' role changes (from their logs) and the client's failed
attempts (the `kvstore.client` DEBUG log). Not a test: figures depend on the
machine.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.compare_etcd import (
    ETCD_ENDPOINTS, PROBE_ATTEMPT_S, PROBE_GIVE_UP_S, PROBE_PAUSE_S, Etcd, _etcd_probe, kv_wait_healthy,
)
from kvstore.client import AsyncClient, FixedInterval
from kvstore.launcher import LocalCluster

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_ROLE_CHANGE = re.compile(r"member \d+ is now .*")


class ClientTrace(logging.Handler):
    """Keeps the client library's DEBUG records (wall-clock time, message) while enabled."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.getMessage()))

    def install(self) -> None:
        lg = logging.getLogger("kvstore.client")
        lg.setLevel(logging.DEBUG)
        lg.addHandler(self)


def role_changes(lc: LocalCluster, since: float, until: float) -> list[tuple[float, str]]:
    """(wall-clock time, line) of every member's role changes logged in [since, until]."""
    out = []
    for i in lc.ids:
        try:
            lines = Path(lc.log_path(i)).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = _LOG_TIME.match(line)
            r = _ROLE_CHANGE.search(line)
            if m and r:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if since <= t <= until:
                    out.append((t, r.group(0)))
    return out


def print_timeline(killed_at: float, members: list[tuple[float, str]], client: list[tuple[float, str]],
                   keep: int = 4) -> None:
    """Every role change; of the client's lines (many and alike while no leader exists) the first and last few."""
    if len(client) > 2 * keep:
        skipped = len(client) - 2 * keep
        client = client[:keep] + [(client[keep][0], f"client: ... {skipped} more lines ...")] + client[-keep:]
    for t, what in sorted(members + client):
        print(f"    {(t - killed_at) * 1000:7.0f} ms  {what}")


async def kv_trial(lc: LocalCluster, trace: ClientTrace | None, default_retry: bool) -> tuple[int, float]:
    """compare_etcd.kv_failover's probe for one trial: (killed member, seconds to the first ack).

    The clock starts just before the kill (compare_etcd starts it just after: the same but for a
    preemption in between, which would flatter the figure). `default_retry` probes with the
    client library's default retry policy instead of the fixed pause both systems get.
    """
    lead = kv_wait_healthy(lc)
    policy = None if default_retry else FixedInterval(interval=PROBE_PAUSE_S, attempt_timeout=PROBE_ATTEMPT_S)
    async with AsyncClient(lc.endpoints, coalesce=False, retry=policy, timeout=PROBE_GIVE_UP_S) as kv:
        await kv.put(b"failover", b"x")  # the client knows the current leader, as a live client would
        if trace:
            trace.records.clear()
        killed_wall = time.time()
        t0 = time.monotonic()
        os.kill(lc.pid(lead), signal.SIGKILL)
        try:
            await kv.put(b"failover", b"x")
            dt = time.monotonic() - t0
        except Exception as e:
            dt = float("inf")
            print(f"  the probe gave up: {type(e).__name__}: {e}", flush=True)
    lc.kill(lead)  # reap it
    if trace:
        client = sorted([(t, "client: " + m) for t, m in trace.records] + [(killed_wall + dt, "client: put acknowledged")])
        print_timeline(killed_wall, role_changes(lc, killed_wall - 0.01, killed_wall + dt + 0.2), client)
    lc.start_node(lead)
    return lead, dt


async def etcd_trial(etcd: Etcd) -> tuple[int, float]:
    """compare_etcd.etcd_failover's probe for one trial: (killed member, seconds to the first ack)."""
    import grpc

    pb, rpc = etcd.stubs()
    chans = [grpc.aio.insecure_channel(ep, options=[("grpc.initial_reconnect_backoff_ms", 50),
                                                    ("grpc.max_reconnect_backoff_ms", 500)])
             for ep in ETCD_ENDPOINTS]
    try:
        lead = etcd.wait_healthy()
        os.kill(etcd.pid(lead), signal.SIGKILL)
        dt = await _etcd_probe([rpc.KVStub(c) for c in chans], pb)
        etcd.restart_member(lead)
        return lead, dt
    finally:
        for c in chans:
            await c.close()


def etcd_ports_taken() -> list[str]:
    """The shared etcd's fixed client ports that something already listens on (another benchmark?)."""
    taken = []
    for ep in ETCD_ENDPOINTS:
        host, port = ep.rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, int(port))) == 0:
                taken.append(ep)
    return taken


def summary(name: str, ts: list[float]) -> str:
    return (f"{name:8s} median {statistics.median(ts) * 1000:6.0f} ms   max {max(ts) * 1000:6.0f} ms   "
            f"min {min(ts) * 1000:6.0f} ms   ({len(ts)} trials)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tick-ms", type=int, default=100)
    ap.add_argument("--election-ticks", type=int, default=10)
    ap.add_argument("--no-etcd", action="store_true", help="measure kvstore alone")
    ap.add_argument("--trace", action="store_true", help="print a timeline of every kvstore trial")
    ap.add_argument("--client-retry", choices=("probe", "default"), default="probe",
                    help="kvstore's client: compare_etcd's fixed 20 ms pause (default), or the library's own policy")
    ap.add_argument("--keep", action="store_true", help="keep the data directories and logs")
    args = ap.parse_args()

    use_etcd = not args.no_etcd and shutil.which("etcd") is not None
    if not args.no_etcd and not use_etcd:
        print("etcd not installed: measuring kvstore alone")
    if use_etcd and etcd_ports_taken():
        sys.exit(f"etcd's ports are taken ({', '.join(etcd_ports_taken())}): is another benchmark running? "
                 "Wait for it, or use --no-etcd.")
    trace = ClientTrace() if args.trace else None
    if trace:
        trace.install()
    work = Path(tempfile.mkdtemp(prefix="kvstore-failover-"))
    lc = LocalCluster.with_free_ports(
        str(work / "kv"), extra_args=["--tick-ms", str(args.tick_ms), "--election-ticks", str(args.election_ticks)])
    etcd = Etcd(work / "etcd") if use_etcd else None
    times: dict[str, list[float]] = {"etcd": [], "kvstore": []}
    try:
        lc.start()
        if etcd:
            etcd.start()
        for trial in range(1, args.trials + 1):
            if etcd:
                lead, dt = asyncio.run(etcd_trial(etcd))
                times["etcd"].append(dt)
                print(f"trial {trial:2d} etcd   : killed e{lead}, first ack after {dt * 1000:5.0f} ms", flush=True)
            lead, dt = asyncio.run(kv_trial(lc, trace, args.client_retry == "default"))
            times["kvstore"].append(dt)
            print(f"trial {trial:2d} kvstore: killed {lead}, first ack after {dt * 1000:5.0f} ms", flush=True)
        print()
        print(f"failover, kill -9 of the leader -> first acknowledged write (election timeout "
              f"{args.tick_ms * args.election_ticks} ms, randomized up to 2x; heartbeat {args.tick_ms} ms):")
        for name, ts in times.items():
            if ts:
                print("  " + summary(name, ts))
        if times["etcd"]:
            print(f"  median ratio kvstore / etcd: "
                  f"{statistics.median(times['kvstore']) / statistics.median(times['etcd']):.2f}")
    finally:
        lc.stop()
        if etcd:
            etcd.stop()
        if args.keep:
            print(f"data and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
