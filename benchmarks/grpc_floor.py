#!/usr/bin/env python
"""The floor under any per-op figure: a Python gRPC server that does nothing, unary vs stream.

kvstore's per-op figures sit on top of what a single grpc.aio process (uvloop,
as kvstore's node runs) can answer when its handler does no work at all. This
script measures that floor next to etcd's put in the same run, for each way a
client can carry its requests:

- unary: one RPC per op, under etcd_load.py's own load (same client code,
  same processes, same concurrency as against etcd);
- per-caller: each caller holds one bidirectional stream and ping-pongs on it;
- shared: every caller of a load process multiplexes onto ONE stream (ids, a
  writer task draining a queue, a reader task matching answers);
- packed: the same, but the writer packs every request waiting in the queue
  into one message and the server answers a message's requests in one
  message, as kvstore's client library and member do on a session stream;
- raw-tcp: the packed scheme on a plain asyncio TCP connection (uvloop, 4-byte
  length prefix) instead of gRPC: the floor of a stream that is not gRPC.

    .venv/bin/python benchmarks/grpc_floor.py [--secs 10] [--clients 256,1] [--procs 2]

The do-nothing server implements etcd_min.proto (the API etcd_load.py drives)
for the unary calls, and one raw-bytes bidirectional method for the streams;
every stream request is the size of a put of a 256-byte value.
"""
from __future__ import annotations

import argparse
import os
import socket
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
FRAME = 8 + 9 + 256  # id, key, value: every request has this size
async def echo_ids(requests, context):
    async for msg in requests:  # answer each request (several when packed) with its 8-byte id, in order
        await context.write(b"".join(msg[i:i + 8] for i in range(0, len(msg), FRAME)))
async def raw_conn(reader, writer):
    try:
        while True:
            n = int.from_bytes(await reader.readexactly(4), "little")
            msg = await reader.readexactly(n)
            ids = b"".join(msg[i:i + 8] for i in range(0, n, FRAME))
            writer.write(len(ids).to_bytes(4, "little") + ids)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = grpc.aio.server()
    rpc.add_KVServicer_to_server(NullKV(), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Null", {"Stream": grpc.stream_stream_rpc_method_handler(echo_ids)}),))
    server.add_insecure_port(sys.argv[1])
    await server.start()
    host, port = sys.argv[1].rsplit(":", 1)
    await asyncio.start_server(raw_conn, host, int(port) + 1)  # raw-tcp mode: the next port
    print("ready", flush=True)
    await server.wait_for_termination()
uvloop.run(main())
"""

#: Closed-loop stream load: `python -c STREAM_LOAD ADDR MODE PROCS CONC SECS`; MODE is
#: "per-caller" (one stream each) or "shared" (one stream per process). Prints etcd_load.py's line.
STREAM_LOAD = r"""
import asyncio, multiprocessing as mp, os, struct, sys, time
import grpc, uvloop

def frame(i, val):
    return struct.pack("<Q", i) + b"k%08d" % (i % 100000) + val

async def per_caller(ch, deadline, lat, val):
    call = ch.stream_stream("/floor.Null/Stream")()
    n = 0
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        await call.write(frame(n, val))
        await call.read()
        lat.append(time.perf_counter() - t)
        n += 1
    call.cancel()
    return n

# callers sharing one connection: a writer task drains the queue (packing what waits, with `pack`),
# a reader task matches the answered ids
async def shared_callers(write, read_ids, conc, deadline, lat, val, pack):
    loop = asyncio.get_running_loop()
    queue, pending = asyncio.Queue(), {}
    async def writer():
        while True:
            parts = [await queue.get()]
            if pack:
                if queue.empty():
                    await asyncio.sleep(0)  # callers woken in this loop turn queue theirs first
                while not queue.empty():
                    parts.append(queue.get_nowait())
            await write(b"".join(parts))
    async def reader():
        while True:
            ids = await read_ids()
            if ids is None:
                return
            for j in range(0, len(ids), 8):
                pending.pop(struct.unpack_from("<Q", ids, j)[0]).set_result(None)
    tasks = [loop.create_task(writer()), loop.create_task(reader())]
    ids = iter(range(1 << 62))
    async def caller():
        n = 0
        while time.perf_counter() < deadline:
            i = next(ids)
            fut = pending[i] = loop.create_future()
            t = time.perf_counter()
            queue.put_nowait(frame(i, val))
            await fut
            lat.append(time.perf_counter() - t)
            n += 1
        return n
    ns = await asyncio.gather(*(caller() for _ in range(conc)))
    for t in tasks:
        t.cancel()
    return sum(ns)

async def shared_grpc(ch, conc, deadline, lat, val, pack):
    call = ch.stream_stream("/floor.Null/Stream")()
    async def read_ids():
        msg = await call.read()
        return None if msg is grpc.aio.EOF else msg
    n = await shared_callers(call.write, read_ids, conc, deadline, lat, val, pack)
    call.cancel()
    return n

async def packed_raw(addr, conc, deadline, lat, val):
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port) + 1)
    async def write_packed(msg):
        writer.write(len(msg).to_bytes(4, "little") + msg)
        await writer.drain()
    async def read_ids():
        try:
            n = int.from_bytes(await reader.readexactly(4), "little")
            return await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return None
    n = await shared_callers(write_packed, read_ids, conc, deadline, lat, val, True)
    writer.close()
    return n

async def run(addr, mode, conc, secs, q):
    async with grpc.aio.insecure_channel(addr) as ch:
        await ch.channel_ready()
        lat, val = [], os.urandom(256)
        deadline = time.perf_counter() + secs
        if mode in ("shared", "packed"):
            n = await shared_grpc(ch, conc, deadline, lat, val, mode == "packed")
        elif mode == "raw-tcp":
            n = await packed_raw(addr, conc, deadline, lat, val)
        else:
            n = sum(await asyncio.gather(*(per_caller(ch, deadline, lat, val) for _ in range(conc))))
        q.put((n, lat))

def proc(args, q):
    uvloop.run(run(*args, q))

if __name__ == "__main__":
    addr, mode, procs, conc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    q = mp.Queue()
    ps = [mp.Process(target=proc, args=((addr, mode, conc, secs), q)) for _ in range(procs)]
    for p in ps:
        p.start()
    res = [q.get() for _ in ps]
    for p in ps:
        p.join()
    total = sum(r[0] for r in res)
    lat = sorted(x for r in res for x in r[1])
    pct = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e3
    print(f"put ops={total} rate={total / secs:.0f}/s p50={pct(.5):.2f}ms p99={pct(.99):.2f}ms clients={procs * conc}")
"""

MODES = ("unary", "per-caller", "shared", "packed", "raw-tcp")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def two_free_ports() -> int:
    """A free port whose successor is free too (the raw-tcp server listens on the next port)."""
    while True:
        port = free_ports(1)[0]
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def null_point(mode: str, clients: int, procs: int, secs: float) -> tuple[float, float, float]:
    """(ops/s, p50 ms, server CPU µs per request) of the do-nothing server under one load ``mode``."""
    addr = f"127.0.0.1:{two_free_ports()}"
    server = subprocess.Popen([sys.executable, "-c", NULL_SERVER, addr, str(SHARED_BENCH)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the do-nothing server did not start")
        cpu0 = cpu_seconds(server.pid)
        if mode == "unary":
            cmd = [sys.executable, str(SHARED_BENCH / "etcd_load.py"), "--target", addr, "--op", "put",
                   "--procs", str(procs), "--conc", str(clients // procs), "--secs", str(secs)]
        else:
            cmd = [sys.executable, "-c", STREAM_LOAD, addr, mode, str(procs), str(clients // procs), str(secs)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120).stdout
        cpu = cpu_seconds(server.pid) - cpu0
    finally:
        server.kill()
        server.wait()
    ops = int(out.split("ops=")[1].split()[0])
    p50 = float(out.split("p50=")[1].split("ms")[0])
    return ops / secs, p50, cpu / max(ops, 1) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=float, default=10.0)
    ap.add_argument("--clients", default="256,1", help="comma-separated caller counts")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--rounds", type=int, default=1, help="etcd and the null server alternate this many times")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        ap.error(f"--modes takes {', '.join(MODES)}")
    workdir = Path(tempfile.mkdtemp(prefix="grpcfloor-"))
    etcd = Etcd(workdir / "etcd")
    etcd.start()
    try:
        etcd.wait_healthy()
        for r in range(a.rounds):
            for clients in (int(c) for c in a.clients.split(",") if c):
                procs = max(1, min(a.procs, clients))
                e = etcd_point("put", clients, procs, a.secs)
                print(f"round {r + 1}, {clients} caller(s): etcd put {e.rate:,.0f}/s p50 {e.p50:.2f} ms", flush=True)
                for mode in modes:
                    rate, p50, us = null_point(mode, clients, procs, a.secs)
                    print(f"  do-nothing server, {mode:<10}: {rate:>9,.0f}/s = {rate / e.rate:.2f}x etcd; "
                          f"p50 {p50:.2f} ms = {p50 / e.p50:.2f}x etcd's; {us:.0f} µs server CPU per request",
                          flush=True)
                time.sleep(1)
    finally:
        etcd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
