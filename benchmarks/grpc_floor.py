#!/usr/bin/env python
"""The floor under any one-RPC-per-op figure: a Python gRPC server that does nothing.

Issue 7 asks that kvstore with client coalescing off (one unary RPC per op)
stay above 0.7x etcd's put throughput. This script measures what a single
grpc.aio process (uvloop, as kvstore's node runs) can answer when its handler
does no work at all, under etcd_load.py's own load (same client code, same
processes, same concurrency), next to etcd in the same run. Whatever kvstore
does per op comes on top of this floor, so a unary figure can never beat it.

    .venv/bin/python benchmarks/grpc_floor.py [--secs 10] [--clients 256] [--procs 2]

The do-nothing server implements etcd_min.proto (the API etcd_load.py drives),
so the load generator is byte for byte the one used against etcd.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from compare_etcd import SHARED_BENCH, Etcd, etcd_point  # noqa: E402
from kvstore.launcher import free_ports  # noqa: E402

NULL_SERVER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[2])
import grpc, uvloop, etcd_load
pb, rpc = etcd_load.stubs()
class NullKV(rpc.KVServicer):
    async def Put(self, request, context):
        return pb.PutResponse()
    async def Range(self, request, context):
        return pb.RangeResponse()
async def main():
    server = grpc.aio.server()
    rpc.add_KVServicer_to_server(NullKV(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
uvloop.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def null_point(clients: int, procs: int, secs: float) -> tuple[float, float]:
    """(ops/s, server CPU µs per RPC) of the do-nothing server under etcd_load.py."""
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    server = subprocess.Popen([sys.executable, "-c", NULL_SERVER, addr, str(SHARED_BENCH)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the do-nothing server did not start")
        cpu0 = cpu_seconds(server.pid)
        cmd = [sys.executable, str(SHARED_BENCH / "etcd_load.py"), "--target", addr, "--op", "put",
               "--procs", str(procs), "--conc", str(clients // procs), "--secs", str(secs)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120).stdout
        cpu = cpu_seconds(server.pid) - cpu0
    finally:
        server.kill()
        server.wait()
    ops = int(out.split("ops=")[1].split()[0])
    return ops / secs, cpu / max(ops, 1) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="etcd and the null server alternate this many times")
    a = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="grpcfloor-"))
    etcd = Etcd(workdir / "etcd")
    etcd.start()
    try:
        etcd.wait_healthy()
        for r in range(a.rounds):
            e = etcd_point("put", a.clients, a.procs, a.secs)
            rate, us = null_point(a.clients, a.procs, a.secs)
            print(f"round {r + 1}: etcd put {e.rate:,.0f}/s | do-nothing grpc.aio server {rate:,.0f}/s "
                  f"({us:.0f} µs server CPU per RPC) = {rate / e.rate:.2f}x etcd; "
                  f"0.7x etcd would be {0.7 * e.rate:,.0f}/s", flush=True)
            time.sleep(1)
    finally:
        etcd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
