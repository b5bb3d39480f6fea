"""Failover time: kill -9 of the leader -> the first acknowledged write at a client.

Starts a real 3-node cluster (free ports, a temporary directory), keeps one
client writing distinct keys through the client library, and for each trial
kills the leader with SIGKILL, notes when the next write is acknowledged,
restarts the killed member and waits until the cluster is whole again.

    .venv/bin/python benchmarks/failover.py [--trials 20] [--tick-ms 100] [--election-ticks 10]

Prints every trial and the median and max. Not a test: figures depend on the
machine; the election timeout (ticks x tick length, randomized up to 2x) is the
floor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.client import Client, ExponentialBackoff  # noqa: E402
from kvstore.server.local_cluster import LocalCluster  # noqa: E402


class Writer(threading.Thread):
    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints, timeout=30, retry=ExponentialBackoff(base=0.01, cap=0.1, deadline=30))
        self.acks: list[float] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            try:
                self.client.put(f"failover/{n}", str(n))
                self.acks.append(time.monotonic())
            except Exception:
                self.errors += 1
            n += 1

    def first_ack_after(self, t: float, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [a for a in self.acks[-200:] if a > t]
            if later:
                return later[0]
            time.sleep(0.005)
        raise TimeoutError("no write acknowledged after the kill")


def whole(lc: LocalCluster, timeout: float = 60.0) -> int:
    """All members up and applied to the same index; the leader."""

    def ok():
        sts = lc.statuses(1.0)
        if any(s is None for s in sts.values()):
            return None
        if len({s.leader_id for s in sts.values()}) == 1 and len({s.applied_index for s in sts.values()}) == 1:
            return next(iter(sts.values())).leader_id or None
        return None

    return lc.wait_for(ok, timeout, "a whole cluster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tick-ms", type=int, default=100)
    ap.add_argument("--election-ticks", type=int, default=10)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvstore-failover-") as d:
        lc = LocalCluster.with_free_ports(
            d, extra_args=["--tick-ms", str(args.tick_ms), "--election-ticks", str(args.election_ticks)])
        lc.start()
        w = None
        try:
            whole(lc)
            w = Writer(lc.endpoints)
            w.start()
            times = []
            for trial in range(1, args.trials + 1):
                leader = whole(lc)
                n = len(w.acks)
                while len(w.acks) < n + 20:  # writes are flowing through this leader
                    time.sleep(0.005)
                lc.kill(leader)
                killed = time.monotonic()
                dt = w.first_ack_after(killed) - killed
                times.append(dt)
                print(f"trial {trial:2d}: killed leader {leader}; first acknowledged write after {dt * 1000:7.0f} ms",
                      flush=True)
                lc.start_node(leader)
            print()
            print(f"failover over {len(times)} trials (election timeout {args.tick_ms * args.election_ticks} ms, "
                  f"randomized up to 2x): median {statistics.median(times) * 1000:.0f} ms, "
                  f"max {max(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms; "
                  f"client errors {w.errors}")
        finally:
            if w is not None:
                w.halt.set()
                w.join(30)
                w.client.close()
            lc.stop()


if __name__ == "__main__":
    main()
