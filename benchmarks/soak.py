#!/usr/bin/env python
"""A soak: minutes of puts at full load while the database grows, kvstore and etcd in one run.

For each system in turn (kvstore first, then etcd, on the same machine), a
3-member cluster takes closed-loop puts from N clients (kvstore coalesced,
256 by default) with values big enough to grow the database by GiBs, keys
uniform over --nkeys. Every --window seconds one row: throughput, p50, p99,
the leader's term, snapshot/compaction events so far (kvstore: checkpoints in
the node logs; etcd: the snapshots its logs report), RSS per member, disk
per member. At the end: leader changes for both, and the goals of the data
size issue (throughput of the last 5 minutes vs the first 5, p99 of every
window vs the first) next to each other.

etcd runs with --quota-backend-bytes raised (default 8 GiB) so it can hold the
same data. The load is measured in windows, one load run per window (a second
or two between windows to start the load processes).

    .venv/bin/python benchmarks/soak.py --minutes 30                 # the issue's run
    .venv/bin/python benchmarks/soak.py --minutes 2 --window 20 --value-bytes 1024 --systems kvstore
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared/bench beside the clone (CI), or beside a parent of it (a worktree)
SHARED_BENCH = next((p / "shared" / "bench" for p in REPO.parents if (p / "shared" / "bench").is_dir()),
                    REPO.parent / "shared" / "bench")
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from kvstore.bench import LoadSpec, default_procs, run_load  # noqa: E402
from kvstore.launcher import LocalCluster, free_ports  # noqa: E402
from kvstore.storage.space import allocated_bytes, lmdb_space  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
_ETCD_LINE = re.compile(r"put ops=(\d+) rate=(\d+)/s p50=([\d.]+)ms p99=([\d.]+)ms")


@dataclass
class Row:
    system: str
    at_s: float
    rate: float
    p50: float
    p99: float
    term: int
    leader: int
    events: int
    rss_mib: list[int]
    disk_mib: list[int]
    errors: int = 0
    in_use_mib: list[int] = field(default_factory=list)  # kvstore: LMDB data (a compacted copy's size) + WAL


@dataclass
class Soak:
    system: str
    rows: list[Row] = field(default_factory=list)
    stalled: str = ""  # why the load ended early: a window that did not finish

    def leader_changes(self) -> int:
        seen = [(r.leader, r.term) for r in self.rows]
        return sum(1 for a, b in zip(seen, seen[1:]) if a != b)


def allocated_mib(path: str) -> int:
    """Disk the files under `path` occupy (sparse files count what is allocated)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total >> 20


def data_and_wal_mib(data_dir: str) -> int:
    """A member's LMDB data (what a compacted copy would hold) plus the disk its WAL takes."""
    try:
        live = lmdb_space(os.path.join(data_dir, "db", "current")).live
    except Exception:  # the member is between generations (installing a snapshot): skip this row's figure
        return 0
    return (live + allocated_bytes(os.path.join(data_dir, "wal"))) >> 20


def rss_mib(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0


def count_in_files(paths: list[Path], needle: str) -> int:
    n = 0
    for p in paths:
        try:
            n += p.read_text(errors="replace").count(needle)
        except OSError:
            pass
    return n


# --- kvstore ------------------------------------------------------------------


def soak_kvstore(a: argparse.Namespace, workdir: Path) -> Soak:
    lc = LocalCluster.with_free_ports(str(workdir / "kvstore"), extra_args=a.node_args.split())
    out = Soak("kvstore")
    lc.start()
    try:
        lc.wait_for_leader(60)
        t0 = time.monotonic()
        while time.monotonic() - t0 < a.minutes * 60:
            spec = LoadSpec(tuple(lc.endpoints), op="put", clients=a.clients, secs=a.window, procs=a.procs,
                            value_size=a.value_bytes, nkeys=a.nkeys, coalesce=True)
            s = run_load(spec)
            leader = lc.leader() or 0
            sts = lc.statuses(2.0)
            st = sts.get(leader)
            row = Row("kvstore", time.monotonic() - t0, s.rate, s.p50, s.p99, st.term if st else 0, leader,
                      count_in_files([Path(lc.log_path(i)) for i in lc.ids], "snapshot saved at index"),
                      [rss_mib(lc.pid(i)) for i in lc.ids], [allocated_mib(lc.data_dir(i)) for i in lc.ids],
                      s.errors, [data_and_wal_mib(lc.data_dir(i)) for i in lc.ids])
            out.rows.append(row)
            print_row(row)
    finally:
        lc.stop()
        if a.dir is None:  # room for the next system's GiBs
            shutil.rmtree(workdir / "kvstore", ignore_errors=True)
    return out


# --- etcd ---------------------------------------------------------------------


class Etcd:
    """A 3-member etcd on free ports, with the backend quota raised."""

    def __init__(self, workdir: Path, quota: int, extra_args: list[str]) -> None:
        self.dir = workdir
        self.quota = quota
        self.extra_args = extra_args
        ports = free_ports(6)
        self.client = {i: f"127.0.0.1:{ports[2 * (i - 1)]}" for i in (1, 2, 3)}
        self.peer = {i: f"127.0.0.1:{ports[2 * (i - 1) + 1]}" for i in (1, 2, 3)}
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (apt-get install -y etcd-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        cluster = ",".join(f"e{i}=http://{self.peer[i]}" for i in (1, 2, 3))
        for i in (1, 2, 3):
            cmd = ["etcd", "--name", f"e{i}", "--data-dir", str(self.dir / f"e{i}.data"),
                   "--listen-client-urls", f"http://{self.client[i]}", "--advertise-client-urls",
                   f"http://{self.client[i]}", "--listen-peer-urls", f"http://{self.peer[i]}",
                   "--initial-advertise-peer-urls", f"http://{self.peer[i]}", "--initial-cluster", cluster,
                   "--initial-cluster-token", "soak", "--initial-cluster-state", "new",
                   "--quota-backend-bytes", str(self.quota), "--log-level", "info", *self.extra_args]
            with open(self.dir / f"e{i}.log", "ab") as log:
                self.procs[i] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.leader_and_term()[0] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("etcd cluster did not elect a leader")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def leader_and_term(self) -> tuple[int, int]:
        """(index 1..3 of the leader, its raft term), (0, 0) when unknown."""
        out = subprocess.run(["etcdctl", f"--endpoints={','.join(self.client.values())}", "--command-timeout=2s",
                              "endpoint", "status", "-w", "json"], env={**os.environ, "ETCDCTL_API": "3"},
                             capture_output=True, text=True, timeout=15)
        try:
            sts = json.loads(out.stdout or "[]")
        except json.JSONDecodeError:
            return 0, 0
        by_id = {s["Status"]["header"]["member_id"]: s["Endpoint"] for s in sts}
        for s in sts:
            lead = s["Status"]["leader"]
            if lead in by_id:
                ep = by_id[lead]
                return next(i for i, c in self.client.items() if ep.endswith(c)), s["Status"]["raftTerm"]
        return 0, 0


def soak_etcd(a: argparse.Namespace, workdir: Path) -> Soak:
    etcd = Etcd(workdir / "etcd", a.etcd_quota, a.etcd_args.split())
    out = Soak("etcd")
    etcd.start()
    procs = max(p for p in range(1, a.procs + 1) if a.clients % p == 0)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < a.minutes * 60:
            cmd = [sys.executable, str(SHARED_BENCH / "etcd_load.py"), "--target", etcd.client[1], "--op", "put",
                   "--procs", str(procs), "--conc", str(a.clients // procs), "--secs", str(a.window),
                   "--vsize", str(a.value_bytes), "--nkeys", str(a.nkeys)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.window + 120)
            except subprocess.TimeoutExpired:  # etcd stopped answering: the run ends here, its rows stand
                out.stalled = (f"at t={time.monotonic() - t0:.0f}s a {a.window:g} s load window had not "
                               f"finished after {a.window + 120:g} s")
                print(f"etcd     {out.stalled}: stopping this system's soak")
                break
            m = _ETCD_LINE.search(res.stdout)
            if not m:
                raise RuntimeError(f"etcd_load.py printed no result: {res.stdout[-300:]} {res.stderr[-800:]}")
            leader, term = etcd.leader_and_term()
            row = Row("etcd", time.monotonic() - t0, float(m.group(2)), float(m.group(3)), float(m.group(4)),
                      term, leader,
                      count_in_files([etcd.dir / f"e{i}.log" for i in (1, 2, 3)], "start to snapshot")  # 3.4
                      + count_in_files([etcd.dir / f"e{i}.log" for i in (1, 2, 3)], "triggering snapshot"),  # 3.5
                      [rss_mib(etcd.procs[i].pid) for i in (1, 2, 3)],
                      [allocated_mib(str(etcd.dir / f"e{i}.data")) for i in (1, 2, 3)])
            out.rows.append(row)
            print_row(row)
    finally:
        etcd.stop()
    return out


# --- report -------------------------------------------------------------------


def print_row(r: Row) -> None:
    console.print(f"{r.system:8} t={r.at_s:6.0f}s {r.rate:8.0f} puts/s p50={r.p50:6.1f}ms p99={r.p99:7.1f}ms "
                  f"term={r.term} leader={r.leader} snapshots={r.events} rss={r.rss_mib} MiB disk={r.disk_mib} MiB"
                  + (f" (LMDB data + WAL {r.in_use_mib} MiB)" if r.in_use_mib else "")
                  + (f" errors={r.errors}" if r.errors else ""))


def goals(s: Soak, window_s: float) -> dict[str, str]:
    if not s.rows:
        return {}
    per5 = max(1, min(int(300 // window_s), len(s.rows) // 2))  # 5 minutes, or half of a shorter run
    first = sum(r.rate for r in s.rows[:per5]) / len(s.rows[:per5])
    last = sum(r.rate for r in s.rows[-per5:]) / len(s.rows[-per5:])
    worst_p99 = max(r.p99 for r in s.rows) / s.rows[0].p99 if s.rows[0].p99 else float("nan")
    return {
        "stalled": s.stalled or "no",
        "minutes of load measured": f"{s.rows[-1].at_s / 60:.1f}",
        "leader changes": str(s.leader_changes()),
        "throughput last 5 min / first 5 min (halves if shorter)": f"{last / first:.2f}" if first else "-",
        "worst window p99 / first window p99": f"{worst_p99:.2f}",
        "disk per member at the end (MiB)": str(s.rows[-1].disk_mib),
        "disk / (LMDB data + WAL), worst member": (
            f"{max(d / u for d, u in zip(s.rows[-1].disk_mib, s.rows[-1].in_use_mib) if u):.2f}"
            if any(s.rows[-1].in_use_mib) else "-"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="load time per system")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per row")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--procs", type=int, default=default_procs(), help="load processes")
    ap.add_argument("--value-bytes", type=int, default=4096, help="value size: 4 KiB over 1M keys grows past 5 GiB")
    ap.add_argument("--nkeys", type=int, default=1_000_000)
    ap.add_argument("--systems", default="kvstore,etcd")
    ap.add_argument("--etcd-quota", type=int, default=8 << 30, help="etcd --quota-backend-bytes")
    ap.add_argument("--node-args", default="", help="extra flags for every kvstore member")
    ap.add_argument("--etcd-args", default="", help="extra flags for every etcd member (e.g. the same auto-compaction)")
    ap.add_argument("--dir", default=None, help="where the data goes (default: a temp dir, removed)")
    a = ap.parse_args()
    workdir = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="soak-"))
    soaks = []
    try:
        for system in a.systems.split(","):
            soaks.append(soak_kvstore(a, workdir) if system == "kvstore" else soak_etcd(a, workdir))
    finally:
        if a.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table = Table(title=f"soak: {a.minutes:g} min of puts, {a.clients} clients, {a.value_bytes} B values, "
                        f"{a.nkeys} keys")
    table.add_column("goal")
    for s in soaks:
        table.add_column(s.system, justify="right")
    results = [goals(s, a.window) for s in soaks]
    for name in (results[0] if results else {}):
        table.add_row(name, *(r.get(name, "-") for r in results))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
