"""An operator's first minutes with `kvstore cluster up` and `kvstore serve`: one line per mistake, no traces.

Real processes: `kvstore cluster up` as a subprocess, a second one on the same
data dir and ports, and `kvstore serve` on a member's data dir while it runs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.storage.data_dir_lock import data_dir_holder
from tests.integration.cluster_up_process import ROOT, ClusterUp, cluster_up_args, free_base_ports


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A `kvstore cluster up` with a leader; its data dir and ports."""
    data = str(tmp_path_factory.mktemp("up") / "data")
    base = free_base_ports()
    up = ClusterUp(cluster_up_args(data, base))
    try:
        up.wait_for_line("leader elected")
        yield up, data, base
        assert up.interrupt() == 0, up.output
        assert "stopped; data kept in" in up.output
        assert all(data_dir_holder(os.path.join(data, f"node{i}")) is None for i in (1, 2, 3))
    finally:
        up.kill()


def test_a_second_cluster_up_on_a_data_dir_in_use_names_the_pid_and_exits_1(running):
    up, data, base = running
    holder = data_dir_holder(os.path.join(data, "node1"))
    assert holder, "member 1's node holds its data dir"
    try:
        r = subprocess.run([sys.executable, "-m", "kvstore.cli", "cluster", "up", *cluster_up_args(data, base)],
                           cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the second cluster up was still running after 60 s:\n{e.stdout}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: data dir {data} is in use by pid {holder} (member 1's node: is another `kvstore cluster up` "
        "running on it?)"], r.stderr
    assert "member" not in r.stdout  # no table of someone else's members
    assert up.proc.poll() is None  # the first one is untouched


def test_kvstore_serve_on_a_data_dir_in_use_prints_one_line(running):
    _, data, _ = running
    node1 = os.path.join(data, "node1")
    holder = data_dir_holder(node1)
    c, p = free_base_ports(1)
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--id", "1", "--data-dir", node1,
                        "--initial-cluster", f"1=127.0.0.1:{p}", "--initial-cluster-clients", f"1=127.0.0.1:{c}"],
                       cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"error: data dir {node1} is in use by pid {holder}"], r.stderr
