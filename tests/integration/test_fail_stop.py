"""Fail-stop under real fault injection: a member whose disk fails stops, and nothing is lost.

Each test restarts one follower of a real 3-member cluster under
`strace -e inject=SYSCALL:error=EIO -P PATH` (or, for the Raft invariant, as a
node whose core breaks an invariant), keeps a writer running through the
client library, and checks what the issue asks of every fatal path:

  * the member exits non-zero (70) within 2 s of the fault (strace's own
    timestamps of the injected call and of the exit), with exactly one FATAL
    line that names the operation and the file;
  * it left its boot guard condemned, so its next start rebuilds the state
    machine from the newest snapshot and the WAL;
  * the other two keep acknowledging writes;
  * restarted without the fault, it rejoins, and every acknowledged write is
    there.

Small snapshot and segment sizes make each path come up within a second or
two of writes: --snapshot-count 150 (snapshot + compaction), 16 KiB WAL
segments (segment creation and removal). A follower restarted for a fault
of its own work (WAL, LMDB, snapshot create) first catches up and only then
do writes start, so it is never sent a snapshot instead.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import grpc
import pytest

from kvstore.launcher import LocalCluster
from kvstore.storage import boot_guard

from kvstore.v1 import cluster_pb2

from server_cluster import caught_up, cluster_stub, settled
from test_server_failover import Writer, assert_all_present

def strace_usable() -> bool:
    """strace is installed and may trace here (a container may forbid ptrace or seccomp filters)."""
    if shutil.which("strace") is None:
        return False
    r = subprocess.run(["strace", "-f", "-q", "--seccomp-bpf", "-o", os.devnull, "-e", "trace=fsync", "true"],
                       capture_output=True)
    return r.returncode == 0


pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not strace_usable(), reason="strace is missing (make system-deps) or may not trace here"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
EXIT_WITHIN_S = 2.0
FATAL_EXIT_CODE = 70
CATCHUP_ENTRIES = 60  # a follower this far behind a leader's snapshot gets the snapshot, not entries


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lc = LocalCluster.with_free_ports(str(tmp_path_factory.mktemp("failstop")), extra_args=[
        "--snapshot-count", "150", "--snapshot-catchup-entries", str(CATCHUP_ENTRIES), "--wal-segment-bytes", "16384"])
    lc.start()
    try:
        lc.wait_for_leader(60)
        yield lc
    finally:
        lc.stop()


@dataclass
class Fault:
    """What to break on the victim and the FATAL line that must name it."""

    name: str
    syscall: str  # injected with EIO
    paths: list[str]  # only calls on these files or directories fail (strace -P)
    expect: str  # regex the FATAL line must match
    lagging: bool = False  # the victim first misses enough entries to need a snapshot
    when: str = "1+"  # which matching calls fail (strace counts per thread)
    leads: bool = False  # the victim is made leader before the writes start
    args: tuple[str, ...] = ()  # extra flags for the victim's run under the fault


def faults(d: str) -> list[Fault]:
    wal = os.path.join(d, "wal")
    segments = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))
    last = int(segments[-1].split(".")[0], 16)
    db = os.path.join(d, "db")
    gens = [os.path.join(db, f"gen-{g:06d}.tmp", "data.mdb") for g in range(1, 16)]
    live = [os.path.join(db, f"gen-{g:06d}", "data.mdb") for g in range(1, 16)]  # as /proc names the open file
    snap = os.path.join(d, "snap")
    e = re.escape
    return [
        Fault("wal-fdatasync", "fdatasync", [os.path.join(wal, f"{s:016x}.wal") for s in range(last, last + 8)],
              rf"fdatasync {e(wal)}/[0-9a-f]{{16}}\.wal: \[Errno 5\]", when="3+"),
        Fault("wal-fdatasync-leader", "fdatasync",
              [os.path.join(wal, f"{s:016x}.wal") for s in range(last, last + 8)],
              rf"fdatasync {e(wal)}/[0-9a-f]{{16}}\.wal: \[Errno 5\] .*storage thread", when="3+", leads=True),
        # --state-machine-sync commit: each apply's LMDB commit fdatasyncs, on the apply thread. The
        # storage thread's few commits while opening come first in its own count (strace counts per thread).
        # A checkpoint's two syncs run on a pool thread with a count of its own: on a loaded machine
        # its eighth may come first, and that fail-stop is as right (it names its operation and file).
        Fault("lmdb-commit", "fdatasync", live,
              rf"(LMDB commit|fdatasync) {e(db)}/current/data\.mdb: \[Errno 5\] .*"
              r"(apply thread|in checkpoint of the state machine)", when="8+",
              args=("--state-machine-sync", "commit")),
        Fault("wal-dir-fsync", "fsync", [wal], rf"fsync {e(wal)}: \[Errno 5\]"),
        Fault("lmdb-msync", "msync", [], rf"msync {e(db)}/current/data\.mdb: \[Errno 5\]"),
        Fault("snapshot-receive", "fsync", [snap], rf"fsync {e(snap)}: \[Errno 5\] .*receiving snapshot \d+",
              lagging=True),
        Fault("snapshot-install", "fsync", gens, rf"fsync {e(db)}/gen-\d{{6}}\.tmp/data\.mdb: \[Errno 5\]",
              lagging=True),
    ]


FAULT_NAMES = ["wal-fdatasync", "wal-fdatasync-leader", "lmdb-commit", "wal-dir-fsync", "lmdb-msync",
               "snapshot-receive", "snapshot-install"]


def strace_prefix(fault: Fault, out: str) -> list[str]:
    cmd = ["strace", "-f", "-q", "--seccomp-bpf", "-tt", "-o", out, "-e", f"trace={fault.syscall}",
           "-e", f"inject={fault.syscall}:error=EIO:when={fault.when}"]
    for p in fault.paths:
        cmd += ["-P", p]
    return cmd


def strace_times(out: str) -> tuple[float, float, int]:
    """(time of the first injected failure, time the last thread exited, exit code) from strace -tt output."""
    injected, exited, code = None, None, None
    for line in open(out):
        m = re.match(r"^\d+\s+(\d+):(\d+):(\d+\.\d+) (.*)$", line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        if "(INJECTED)" in m[4] and injected is None:
            injected = t
        x = re.match(r"\+\+\+ exited with (\d+) \+\+\+", m[4])
        if x:
            exited, code = t, int(x[1])
    assert injected is not None, f"no call was failed; strace output:\n{open(out).read()[-2000:]}"
    assert exited is not None, f"no exit in the strace output:\n{open(out).read()[-2000:]}"
    return injected, exited, code


def log_since(lc: LocalCluster, i: int, offset: int) -> str:
    with open(lc.log_path(i), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(lc: LocalCluster, i: int) -> int:
    try:
        return os.path.getsize(lc.log_path(i))
    except FileNotFoundError:
        return 0


def log_time(line: str) -> float:
    """Seconds since midnight of a node log line (asctime: 'YYYY-mm-dd HH:MM:SS,mmm ...')."""
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.hour * 3600 + stamp.minute * 60 + stamp.second + stamp.microsecond / 1e6


def wait_exit(lc: LocalCluster, i: int, timeout: float) -> int:
    p = lc.procs[i]
    deadline = time.monotonic() + timeout
    while p.poll() is None:
        assert time.monotonic() < deadline, \
            f"member {i} did not stop within {timeout}s of the fault:\n{lc.log_tail(i, 30)}"
        time.sleep(0.05)
    return p.returncode


def one_fatal_line(text: str) -> str:
    fatal = [line for line in text.splitlines() if "FATAL" in line]
    assert len(fatal) == 1, f"expected exactly one FATAL line, got {len(fatal)}:\n" + "\n".join(fatal or [text[-3000:]])
    return fatal[0]


def make_lag(lc: LocalCluster, victim: int, leader: int, w: Writer) -> None:
    """With the victim stopped, write until the leader has compacted past everything it has."""
    behind = lc.status(leader).commit_index

    def compacted_past() -> bool:
        st = lc.status(leader)  # the log is compacted to CATCHUP_ENTRIES below the snapshot when it is taken
        return st is not None and st.snapshot_index > behind + CATCHUP_ENTRIES + 10

    lc.wait_for(compacted_past, 60, "a leader snapshot past the stopped member")


def caught_up_or_stopped(lc: LocalCluster, victim: int) -> None:
    """Wait until the victim has applied what the leader has committed, or has already stopped (a fault
    can meet it while it opens its storage)."""
    leader = lc.wait_for(lambda: lc.status(lc.wait_for_leader(30, exclude=victim)), 30, "the leader's status")
    target = leader.commit_index

    def done() -> bool:
        st = lc.status(victim)
        return not lc.is_running(victim) or (st is not None and st.applied_index >= target)

    lc.wait_for(done, 60, f"member {victim} applying up to {target} (or stopping)")


def stop_writer(w: Writer) -> None:
    if w.ident is None:
        w.client.close()
    else:
        w.finish()


def rejoin_and_check(lc: LocalCluster, victim: int, w: Writer, offset: int) -> None:
    """Restart the victim without the fault; it rebuilds, catches up and holds every acknowledged write."""
    lc.prefix.pop(victim, None)
    lc.node_args.pop(victim, None)
    restart_at = log_size(lc, victim)
    lc.start_node(victim)
    w.wait_for_acks(15)
    w.finish()
    assert not w.failed, f"writes failed while a member was down: {w.failed[:3]}"
    caught_up(lc, victim)
    assert_all_present(lc, victim, w.acked, serializable=True)
    assert_all_present(lc, lc.wait_for_leader(30), w.acked, serializable=False)
    restarted = log_since(lc, victim, restart_at)
    # the guard was condemned: it is not trusted (rebuilt, or rolled back to a durable base)
    assert "has unsynced commits from an earlier boot" in restarted, "the condemned state machine was trusted again"
    assert "FATAL" not in restarted


def check_fatal_exit(lc: LocalCluster, victim: int, w: Writer, offset: int, expect: str) -> str:
    """The victim exited with 70 and one FATAL line matching `expect`; the guard is condemned; others serve."""
    code = wait_exit(lc, victim, 60)
    text = log_since(lc, victim, offset)
    line = one_fatal_line(text)
    assert code == FATAL_EXIT_CODE, f"member {victim} exited with {code}:\n{text[-3000:]}"
    assert re.search(expect, line), f"the FATAL line does not name the operation and file:\n{line}"
    guard = os.path.join(lc.data_dir(victim), "db", boot_guard.GUARD_NAME)
    assert open(guard).read().strip() == boot_guard.CONDEMNED, "the boot guard was not left condemned"
    try:
        w.wait_for_acks(15)  # the other two keep serving
    except AssertionError as e:  # say what the two were doing: their logs go with the tmp dir
        tails = "\n".join(f"--- member {i}:\n{log_since(lc, i, max(0, log_size(lc, i) - 12000))}"
                          for i in lc.ids if i != victim)
        raise AssertionError(f"{e}\n{tails}") from None
    return line


@pytest.mark.parametrize("name", FAULT_NAMES)
def test_a_failed_sync_stops_the_member_within_two_seconds(cluster, tmp_path, name):
    leader = settled(cluster)
    victim = next(i for i in cluster.ids if i != leader)
    w = Writer(cluster.endpoints, f"fs-{name}")
    try:
        cluster.stop_node(victim)
        fault = next(f for f in faults(cluster.data_dir(victim)) if f.name == name)
        if fault.lagging:  # writes while it is down, until it can only catch up by a snapshot
            w.start()
            make_lag(cluster, victim, leader, w)
        out = str(tmp_path / "strace.out")
        cluster.prefix[victim] = strace_prefix(fault, out)
        cluster.node_args[victim] = list(fault.args)
        offset = log_size(cluster, victim)
        cluster.start_node(victim)
        if not fault.lagging:  # it rejoins with the log the others have: the fault meets its own work
            caught_up_or_stopped(cluster, victim)
            if fault.leads and cluster.is_running(victim):
                transfer_leadership(cluster, victim)
            w.start()
        line = check_fatal_exit(cluster, victim, w, offset, fault.expect)
        injected, exited, code = strace_times(out)
        assert code == FATAL_EXIT_CODE
        print(f"{name}: exit {exited - injected:.3f}s after the injected {fault.syscall}: {line}")
        assert exited - injected < EXIT_WITHIN_S, f"exited {exited - injected:.2f}s after the fault"
        rejoin_and_check(cluster, victim, w, offset)
    finally:
        cluster.prefix.pop(victim, None)
        cluster.node_args.pop(victim, None)
        stop_writer(w)


def transfer_leadership(lc: LocalCluster, target: int) -> None:
    """Ask whoever leads to hand over to `target` until it leads (a busy machine may need a few tries)."""
    def leads() -> bool:
        leader = lc.leader()
        if leader == target:
            return True
        if leader is not None:
            try:
                cluster_stub(lc.client_addr(leader)).TransferLeadership(
                    cluster_pb2.TransferLeadershipRequest(target_id=target), timeout=10)
            except grpc.RpcError:
                pass  # not caught up yet, or leadership moved meanwhile: ask again
        return lc.leader() == target

    lc.wait_for(leads, 60, f"member {target} leading", interval=0.2)


PLANTED = {
    "step": r"raft step of APPEND from member \d.*",
    "tick": r"the tick loop",
}


@pytest.mark.parametrize("where", sorted(PLANTED))
def test_a_raft_invariant_broken_in_the_core_stops_the_member(cluster, where):
    """The core raises AssertionError (stepping a peer's AppendEntries, or ticking): the member stops at once."""
    leader = settled(cluster)
    victim = next(i for i in cluster.ids if i != leader)
    w = Writer(cluster.endpoints, f"fs-invariant-{where}")
    w.start()
    try:
        w.wait_for_acks(10)
        cluster.stop_node(victim)
        cluster.prefix[victim] = [sys.executable, os.path.join(HERE, "planted_invariant_node.py"), where]
        offset = log_size(cluster, victim)
        cluster.start_node(victim)
        line = check_fatal_exit(cluster, victim, w, offset, PLANTED[where] + r": AssertionError: commit \d+ beyond "
                                r"last index \d+ \(raised at \S+/kvstore/raft/log\.py:\d+\)")
        planted = next(x for x in log_since(cluster, victim, offset).splitlines() if "PLANTED" in x)
        took = log_time(line) - log_time(planted)
        print(f"invariant in {where}: FATAL {took:.3f}s after the planted violation: {line}")
        assert took < EXIT_WITHIN_S
        rejoin_and_check(cluster, victim, w, offset)
    finally:
        cluster.prefix.pop(victim, None)
        stop_writer(w)
