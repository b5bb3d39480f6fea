"""What the client library costs, and what coalescing buys.

Starts a local 3-node cluster (real processes, free ports) and prints:

1. single-caller put latency (p50/p99): a raw grpc.aio stub straight to the
   leader (the floor), a raw sync stub, the AsyncClient with and without
   coalescing, and the blocking Client;
2. closed-loop puts from 128 concurrent callers on one AsyncClient, coalescing
   on vs off: ops/s, p50, p99, and how many ops each RPC carried.

    python benchmarks/client_overhead.py [--n 2000] [--secs 5] [--callers 128]

``--cpu`` measures instead the client library's own CPU per op on the
coalesced path, with no cluster and no network: 128 closed-loop callers (the
shape of one `kvstore bench` load process at 256 clients) on one AsyncClient
whose stubs serialize each request and parse a canned reply of the right size.
It is stable enough to compare two versions of the client on a busy machine
(the least of several rounds is printed); the end-to-end figure including
gRPC is `client_cpu` in `kvstore bench --json`/format_line. ``--cpu --threads
32 --rtt-ms 1`` does the same for the blocking Client from 32 threads (one
`kvstore bench --blocking` load process at 64 clients), each canned batch
answered 1 ms later, and also prints the ops per batch.

Everything runs in this one process against the cluster, so the figures
include the client's own CPU, as a user would see it. 256-byte values.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.client import AsyncClient, Client
from kvstore.client.session import Session
from kvstore.launcher import LocalCluster
from kvstore.v1 import kv_pb2, kv_pb2_grpc

VALUE = b"x" * 256


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def line(name: str, lat: list[float]) -> str:
    return f"  {name:<34} p50 {pct(lat, 0.5) * 1e6:8.0f} us   p99 {pct(lat, 0.99) * 1e6:8.0f} us"


def _put_req(session: Session, key: bytes) -> tuple[kv_pb2.PutRequest, int]:
    seq = session.begin()
    rid = kv_pb2.RequestId(client_id=session.client_id, seq=seq, acked_below=session.acked_below,
                           opens_session=session.opens(seq, maybe_applied=False))
    return kv_pb2.PutRequest(key=key, value=VALUE, request_id=rid), seq


async def single_async(endpoints: list[str], leader: str, n: int, op: str) -> dict[str, list[float]]:
    """Raw aio stub vs AsyncClient (coalesce on/off), interleaved call by call.

    Interleaving puts every variant under the same disk and scheduler noise,
    so the differences are the client's own cost. ``op`` is "put" or "sget"
    (a serializable get: no fsync, no quorum, so the client's share shows).
    """
    session = Session()
    lat: dict[str, list[float]] = {"raw": [], "on": [], "off": []}
    sget = kv_pb2.RangeRequest(key=b"seq/0", serializable=True)
    async with grpc.aio.insecure_channel(leader) as ch, AsyncClient(endpoints) as on, AsyncClient(
        endpoints, coalesce=False
    ) as off:
        stub = kv_pb2_grpc.KVStub(ch)
        await on.put("seq/0", VALUE)
        await off.put("seq/0", VALUE)
        # Serializable reads go to the leader too, so every variant asks the same member.
        for c in (on, off):
            c._balancer = _Fixed(leader)
        perf = time.perf_counter
        for i in range(n):
            key = b"seq/%d" % i
            if op == "put":
                req, seq = _put_req(session, key)
                t = perf()
                await stub.Put(req, timeout=5)
                lat["raw"].append(perf() - t)
                session.finish(seq)
                t = perf()
                await on.put(key, VALUE)
                lat["on"].append(perf() - t)
                t = perf()
                await off.put(key, VALUE)
                lat["off"].append(perf() - t)
            else:
                t = perf()
                await stub.Range(sget, timeout=5)
                lat["raw"].append(perf() - t)
                t = perf()
                await on.get(b"seq/0", serializable=True)
                lat["on"].append(perf() - t)
                t = perf()
                await off.get(b"seq/0", serializable=True)
                lat["off"].append(perf() - t)
    return lat


class _Fixed:
    """A balancer that always picks one member (keeps the comparison like for like)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def pick(self, candidates):  # type: ignore[no-untyped-def]
        return self.addr

    def started(self, endpoint: str) -> None:
        pass

    def finished(self, endpoint: str) -> None:
        pass


def single_sync(endpoints: list[str], leader: str, n: int) -> dict[str, list[float]]:
    """Raw sync stub vs the blocking Client, interleaved call by call."""
    session = Session()
    lat: dict[str, list[float]] = {"raw": [], "client": []}
    with grpc.insecure_channel(leader) as ch, Client(endpoints) as c:
        stub = kv_pb2_grpc.KVStub(ch)
        c.put("warm", "up")
        perf = time.perf_counter
        for i in range(n):
            key = b"sync/%d" % i
            req, seq = _put_req(session, key)
            t = perf()
            stub.Put(req, timeout=5)
            lat["raw"].append(perf() - t)
            session.finish(seq)
            t = perf()
            c.put(key, VALUE)
            lat["client"].append(perf() - t)
    return lat


async def closed_loop(endpoints: list[str], callers: int, secs: float, coalesce: bool) -> tuple[float, list[float], float]:
    """``callers`` tasks, each with one put in flight, for ``secs``; (ops/s, latencies, ops per RPC)."""
    async with AsyncClient(endpoints, coalesce=coalesce, timeout=30) as c:
        await c.put("warm", "up")
        lat: list[float] = []
        stop = False
        rpcs0 = c.coalescer.rpcs if c.coalescer else 0
        ops0 = c.coalescer.ops if c.coalescer else 0

        async def caller(w: int) -> None:
            i = 0
            while not stop:
                t = time.perf_counter()
                await c.put(b"k%08d" % ((w * 7919 + i) % 100_000), VALUE)
                lat.append(time.perf_counter() - t)
                i += 1

        tasks = [asyncio.ensure_future(caller(w)) for w in range(callers)]
        await asyncio.sleep(0.5)  # warm-up, not measured
        lat.clear()
        if c.coalescer:
            rpcs0, ops0 = c.coalescer.rpcs, c.coalescer.ops
        t0 = time.perf_counter()
        await asyncio.sleep(secs)
        done = len(lat)
        elapsed = time.perf_counter() - t0
        per_rpc = ((c.coalescer.ops - ops0) / max(1, c.coalescer.rpcs - rpcs0)) if c.coalescer else 1.0
        stop = True
        await asyncio.gather(*tasks)
        return done / elapsed, lat[:done], per_rpc


class _CannedConn:
    """Stubs that serialize the request and answer from canned bytes (the client's share of a real RPC)."""

    def __init__(self, op: str, rtt: float = 0.0) -> None:
        one = kv_pb2.BatchResult()
        if op == "put":
            one.response.response_put.header.revision = 123456
        else:
            rr = one.response.response_range
            rr.header.member_id, rr.header.revision, rr.header.raft_term = 1, 123456, 2
            rr.kvs.add(key=b"k00001234", value=VALUE, create_revision=1000, mod_revision=123000, version=3)
            rr.count = 1
        replies: dict[int, bytes] = {}

        def reply(n: int) -> bytes:
            if n not in replies:
                resp = kv_pb2.BatchResponse()
                resp.header.revision = 123456
                for _ in range(n):
                    resp.results.add().CopyFrom(one)
                replies[n] = resp.SerializeToString()
            return replies[n]

        async def batch(req, timeout=None):  # type: ignore[no-untyped-def]
            req.SerializeToString()
            await asyncio.sleep(rtt)  # 0: the next loop turn
            return kv_pb2.BatchResponse.FromString(reply(len(req.ops)))

        alone = one.response.response_put if op == "put" else one.response.response_range

        async def unary(req, timeout=None):  # type: ignore[no-untyped-def]
            req.SerializeToString()  # a batch of one goes out as its unary RPC (warm-up only)
            await asyncio.sleep(0)
            return alone

        self.methods = {"Batch": batch, "Put": unary, "Range": unary}
        self._stream = _CannedStream({"batch": batch, "put": unary, "range": unary})

    def stream(self) -> _CannedStream:
        return self._stream


class _CannedStream:
    """The session stream's call, answered by the canned stubs (the framing is the client's share too)."""

    def __init__(self, by_kind: dict) -> None:  # type: ignore[type-arg]
        self.by_kind = by_kind

    async def call(self, kind: str, request, timeout: float):  # type: ignore[no-untyped-def]
        return await self.by_kind[kind](request)


async def client_cpu(op: str, callers: int = 128, per_caller: int = 200, rounds: int = 7) -> float:
    """Least CPU µs per op over ``rounds`` of ``callers`` x ``per_caller`` closed-loop calls (canned transport)."""
    import random

    value = os.urandom(256)
    keys = [b"k%08d" % i for i in range(100_000)]
    async with AsyncClient(["canned:1", "canned:2", "canned:3"]) as kv:
        conn = _CannedConn(op)
        kv._endpoints.conn = lambda addr: conn  # type: ignore[method-assign]
        serializable = op == "sget"
        perf = time.perf_counter

        async def caller(lat: list[float]) -> None:
            rand = random.random
            for _ in range(per_caller):  # the same per-op work as kvstore bench's loop
                k = keys[int(rand() * 100_000)]
                t = perf()
                if op == "put":
                    await kv.put(k, value)
                else:
                    await kv.get(k, serializable=serializable)
                lat.append(perf() - t)

        best = float("inf")
        for r in range(rounds + 1):
            lat: list[float] = []
            c0 = time.process_time()
            await asyncio.gather(*(caller(lat) for _ in range(callers)))
            if r:  # the first round warms up
                best = min(best, (time.process_time() - c0) / len(lat) * 1e6)
        return best


def blocking_cpu(op: str, threads: int = 32, per_thread: int = 300, rounds: int = 7,
                 rtt: float = 0.0) -> tuple[float, float]:
    """The blocking Client from ``threads`` threads, canned transport answering a batch ``rtt``
    seconds later: (least CPU µs per op, ops per batch)."""
    import random
    import threading

    value = os.urandom(256)
    keys = [b"k%08d" % i for i in range(100_000)]
    with Client(["canned:1", "canned:2", "canned:3"]) as kv:
        conn = _CannedConn(op, rtt)
        kv.async_client._endpoints.conn = lambda addr: conn  # type: ignore[method-assign]
        co = kv.async_client.coalescer
        assert co is not None
        serializable = op == "sget"

        def caller(seed: int) -> None:
            rand = random.Random(seed).random
            for _ in range(per_thread):
                k = keys[int(rand() * 100_000)]
                if op == "put":
                    kv.put(k, value)
                else:
                    kv.get(k, serializable=serializable)

        best, per_batch = float("inf"), 0.0
        for r in range(rounds + 1):
            rpcs0, ops0 = co.rpcs, co.ops
            ts = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
            c0 = time.process_time()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            cpu = (time.process_time() - c0) / (threads * per_thread) * 1e6
            if r and cpu < best:  # the first round warms up
                best, per_batch = cpu, (co.ops - ops0) / max(1, co.rpcs - rpcs0)
        return best, per_batch


def cpu_main(ops: list[str], threads: int, rtt: float) -> None:
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    if threads:
        print(f"blocking Client CPU per op, {threads} threads, canned transport, batches answered after "
              f"{rtt * 1e3:g} ms (least of 7 rounds):")
        for op in ops:
            cpu, per_batch = blocking_cpu(op, threads, rtt=rtt)
            print(f"  {op:<5} {cpu:6.2f} us/op   {per_batch:5.1f} ops/batch")
        return
    print("client CPU per op on the coalesced path, 128 callers, canned transport (least of 7 rounds):")
    for op in ops:
        print(f"  {op:<5} {run(client_cpu(op)):6.2f} us/op")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="sequential puts per single-caller run")
    ap.add_argument("--secs", type=float, default=5.0, help="measured seconds per closed-loop run")
    ap.add_argument("--callers", type=int, default=128)
    ap.add_argument("--dir", default=None, help="data directory (default: a temp dir)")
    ap.add_argument("--cpu", action="store_true", help="only the client's CPU per op, canned transport, no cluster")
    ap.add_argument("--ops", default="put,get,sget", help="with --cpu: which ops")
    ap.add_argument("--threads", type=int, default=0,
                    help="with --cpu: the blocking Client from this many threads instead of the AsyncClient")
    ap.add_argument("--rtt-ms", type=float, default=0.0,
                    help="with --cpu --threads: the canned transport answers a batch this much later (a round trip)")
    args = ap.parse_args()
    if args.cpu:
        cpu_main([o for o in args.ops.split(",") if o], args.threads, args.rtt_ms / 1e3)
        return

    base = args.dir or tempfile.mkdtemp(prefix="kvstore-client-bench-")
    with LocalCluster.with_free_ports(base) as lc:
        leader = lc.wait_for_leader(60)
        eps = lc.endpoints
        laddr = lc.client_addr(leader)
        print(f"cluster: {eps}, leader member {leader} at {laddr}; {os.cpu_count()} CPUs")

        for op in ("put", "sget"):
            what = "puts of 256 B" if op == "put" else "serializable gets (no fsync: the client's share shows)"
            print(f"\nsingle caller, {args.n} sequential {what}, variants interleaved:")
            lat = asyncio.run(single_async(eps, laddr, args.n, op))
            print(line("raw grpc.aio stub (floor)", lat["raw"]))
            print(line("AsyncClient, coalesce on", lat["on"]))
            print(line("AsyncClient, coalesce off", lat["off"]))
            floor = pct(lat["raw"], 0.5)
            print(
                f"  p50 cost of the client over the raw stub: coalesce on {(pct(lat['on'], .5) - floor) * 1e6:+.0f} us,"
                f" off {(pct(lat['off'], .5) - floor) * 1e6:+.0f} us"
            )
        lat = single_sync(eps, laddr, args.n)
        print(f"\nsingle thread, {args.n} sequential puts, blocking:")
        print(line("raw sync grpc stub", lat["raw"]))
        print(line("Client (blocking)", lat["client"]))
        print(f"  p50 cost of the client over the raw stub: {(pct(lat['client'], .5) - pct(lat['raw'], .5)) * 1e6:+.0f} us")

        print(f"\n{args.callers} concurrent callers, closed loop, {args.secs:g}s each, one AsyncClient:")
        results = {}
        for coalesce in (False, True):
            rate, lat, per_rpc = asyncio.run(closed_loop(eps, args.callers, args.secs, coalesce))
            results[coalesce] = rate
            name = "coalesce on " if coalesce else "coalesce off"
            print(
                f"  {name}  {rate:9,.0f} ops/s   p50 {pct(lat, .5) * 1e3:7.2f} ms   "
                f"p99 {pct(lat, .99) * 1e3:7.2f} ms   {per_rpc:6.1f} ops/RPC"
            )
        print(f"  speed-up from coalescing: {results[True] / results[False]:.1f}x")


if __name__ == "__main__":
    main()
