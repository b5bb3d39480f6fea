"""Nodes die with the process that launched them, even when it gets no chance to clean up.

A launcher is SIGKILLed after starting three nodes (one of them restarted from
a thread that has since ended: Linux ties the death signal to the forking
thread, so that node must survive its thread and still die with the process).
KVSTORE_TESTING_NO_PDEATHSIG=1 turns the mechanism off: this test then fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.integration.cluster_up_process import ROOT

LAUNCHER = """
import sys, threading, time
from kvstore.launcher import LocalCluster
lc = LocalCluster.with_free_ports(sys.argv[1], 3)
lc.start()
lc.wait_for_leader(60)
restarter = threading.Thread(target=lc.restart, args=(3,))
restarter.start()
restarter.join()
lc.wait_for(lambda: lc.status(3) is not None, 60, "member 3 answering after its restart")
lc.check_alive()
print(" ".join(str(lc.pid(i)) for i in lc.ids), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_nodes_die_with_a_killed_launcher(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert launcher.stdout is not None
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 3, "the launcher did not start its cluster"
        assert all(alive(p) for p in pids), "a node died with the thread that started it"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "nodes outlived their launcher"
    finally:
        launcher.kill()
        launcher.wait()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
