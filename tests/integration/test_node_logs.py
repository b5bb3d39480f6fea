"""A node's log events, read from real nodes' logs in `--log-format json`: one object per line, each
with the member id and the term.

Leader changes, peers lost and regained (a member killed, then restarted),
snapshots and compactions, and a slow fdatasync: strace delays the node's
real fdatasync calls (every third) by 1.1 s, as etcd warns "slow fdatasync" past 1 s.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kvstore.client import Client
from kvstore.launcher import LocalCluster, free_ports
from kvstore.storage.data_dir_lock import data_dir_holder
from tests.integration.cluster_up_process import ROOT


def events(path: str, member: int) -> list[dict]:
    """Every line of a node's log, each checked to be one JSON object naming `member` and a term."""
    with open(path) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for d in docs:
        assert d["member"] == member and isinstance(d["term"], int) and d["msg"], d
    return docs


def wait_for_event(path: str, member: int, timeout: float = 60.0, **match: object) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [d for d in events(path, member) if all(d.get(k) == v for k, v in match.items())]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no event {match} in {path} within {timeout}s")
        time.sleep(0.1)


def test_leader_changes_and_peers_lost_and_regained(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), 3, extra_args=["--log-format", "json"])
    with lc:
        lead = lc.wait_for_leader(60)
        elected = wait_for_event(lc.log_path(lead), lead, event="leader-changed", role="leader")
        assert elected["term"] >= 1 and elected["leader"] == lead
        follower = next(i for i in lc.ids if i != lead)
        lc.kill(follower)
        lost = wait_for_event(lc.log_path(lead), lead, event="peer-lost", peer=follower)
        assert lost["level"] == "warning"
        lc.start_node(follower)
        wait_for_event(lc.log_path(lead), lead, event="peer-regained", peer=follower)
        lc.stop_node(lead)  # hands leadership over first
        new = lc.wait_for_leader(60, exclude=lead)
        changed = wait_for_event(lc.log_path(new), new, event="leader-changed", role="leader", leader=new)
        assert changed["term"] > elected["term"]
    for i in lc.ids:
        events(lc.log_path(i), i)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (make system-deps installs it)")
def test_slow_fdatasync_snapshots_and_compactions(tmp_path):
    client_port, peer_port = free_ports(2)
    data, log_path = str(tmp_path / "node1"), str(tmp_path / "node1.log")
    strace = ["strace", "-f", "-qq", "-o", "/dev/null", "--seccomp-bpf", "-e", "trace=fdatasync",
              "-e", "inject=fdatasync:delay_exit=1100000:when=2+3"]  # the 2nd, 5th, 8th...
    node = [sys.executable, "-m", "kvstore.server.main", "--data-dir", data, "--log-format", "json",
            "--initial-cluster", f"1=127.0.0.1:{peer_port}", "--initial-cluster-clients", f"1=127.0.0.1:{client_port}",
            "--snapshot-count", "2", "--snapshot-catchup-entries", "1"]
    with open(log_path, "wb") as log:
        traced = subprocess.Popen([*strace, *node], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    pid = None
    try:
        wait_for_event(log_path, 1, event="leader-changed", role="leader")
        pid = data_dir_holder(data)
        with Client([f"127.0.0.1:{client_port}"], timeout=60) as c:
            for i in range(4):
                c.put(f"k{i}", "v")
        slow = wait_for_event(log_path, 1, event="slow-fdatasync")
        assert slow["level"] == "warning" and slow["took_s"] > 1.0 and slow["term"] >= 1
        assert wait_for_event(log_path, 1, event="snapshot-saved")["index"] >= 2
        assert wait_for_event(log_path, 1, event="log-compacted")["compact_index"] >= 2
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)  # the node itself: strace blocks the signals sent to it
        try:
            traced.wait(60)
        finally:
            traced.kill()
            if pid and data_dir_holder(data):
                os.kill(pid, signal.SIGKILL)
