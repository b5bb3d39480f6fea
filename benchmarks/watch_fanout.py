#!/usr/bin/env python
"""Watch fan-out, kvstore next to etcd in one invocation: W watchers on one prefix while C clients put.

For each system in turn (interleaved over --rounds: etcd, kvstore, kvstore,
etcd, ...): W watchers on the prefix `fan/` are opened, spread over S
streams (W/S watches per stream, as clients multiplex them) and over the
three members, in R receiver processes; then C closed-loop writers put
64-byte values under the prefix for --secs seconds. Each value carries the
writer's wall-clock time just before it sent the put; a receiver notes, for
each event, now - that time ("write to delivery": the put's own commit
latency plus the delivery). Reported per point: acknowledged puts/s, events
delivered/s (over every watcher), and p50/p99 of write-to-delivery, with the
share of the expected events (puts x W) that arrived before the end.

Watchers speak raw gRPC to both: kvstore's watch.proto uses etcd's field
numbers, so one encoder speaks to both (`/etcdserverpb.Watch/Watch` vs
`/kvstore.v1.Watch/Watch`). Writers use unary Put to etcd and kvstore's
client library (session streams, coalescing) to kvstore.
The receivers and writers run on the same 2 cores as the clusters, so the
figures are the whole machine's; only the ratio between the two lines of one
run means anything.

    .venv/bin/python benchmarks/watch_fanout.py [--watchers 1000] [--clients 256] [--secs 10] [--rounds 1]
    (etcd is started by ../shared/bench/etcd_cluster.sh; KVSTORE_SHARED_BENCH names another place)
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import grpc  # noqa: E402

from kvstore.launcher import LocalCluster  # noqa: E402
from kvstore.v1 import kv_pb2, watch_pb2  # noqa: E402

PREFIX = b"fan/"
PREFIX_END = b"fan0"
STAMP = struct.Struct(">d")
PATHS = {
    "etcd": ("/etcdserverpb.Watch/Watch", "/etcdserverpb.KV/Put"),
    "kvstore": ("/kvstore.v1.Watch/Watch", "/kvstore.v1.KV/Put"),
}
OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def receiver(system: str, addrs: list[str], streams: int, per_stream: int, secs: float, ready, go, out) -> None:
    """One process: `streams` watch streams of `per_stream` watches each; counts and latencies."""
    async def main() -> None:
        watch_path = PATHS[system][0]
        latencies: list[float] = []
        count = [0]
        created = [0]
        all_created = asyncio.Event()

        async def one(k: int) -> None:
            ch = grpc.aio.insecure_channel(addrs[k % len(addrs)], options=OPTIONS)
            call = ch.stream_stream(watch_path, request_serializer=watch_pb2.WatchRequest.SerializeToString,
                                    response_deserializer=watch_pb2.WatchResponse.FromString)()
            for i in range(per_stream):
                await call.write(watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(
                    key=PREFIX, range_end=PREFIX_END, watch_id=i + 1)))
            sample = k == 0  # latencies from one stream's watchers (every watcher sees the same events)
            try:
                async for resp in call:
                    if resp.created:
                        created[0] += 1
                        if created[0] == streams * per_stream:
                            all_created.set()
                        continue
                    if not resp.events:
                        continue
                    now = time.time()
                    count[0] += len(resp.events)
                    if sample and resp.watch_id == 1:
                        for ev in resp.events:
                            latencies.append(now - STAMP.unpack_from(ev.kv.value)[0])
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                await ch.close()

        tasks = [asyncio.ensure_future(one(k)) for k in range(streams)]
        await all_created.wait()
        ready.release()
        await asyncio.to_thread(go.wait)
        count[0] = 0
        latencies.clear()
        await asyncio.sleep(secs + 2.0)  # the writers' time, and a little for the tail to arrive
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put((count[0], latencies))

    asyncio.run(main())


def writer(system: str, addr: str, clients: int, secs: float, ready, go, out) -> None:
    """Closed-loop puts: raw unary calls to etcd, kvstore's own client (session streams, coalescing) to kvstore,
    as each system's users would write."""
    async def main() -> None:
        ch = grpc.aio.insecure_channel(addr, options=OPTIONS)
        if system == "etcd":
            unary = ch.unary_unary(PATHS[system][1], request_serializer=kv_pb2.PutRequest.SerializeToString,
                                   response_deserializer=lambda b: b)

            async def put(req: kv_pb2.PutRequest, timeout: float) -> None:
                await unary(req, timeout=timeout)
        else:
            from kvstore.client import AsyncClient

            kv = AsyncClient([addr], timeout=5)

            async def put(req: kv_pb2.PutRequest, timeout: float) -> None:
                await kv.put(req.key, req.value)
        done = [0]
        ready.release()
        await asyncio.to_thread(go.wait)
        stop = time.monotonic() + secs

        async def client(c: int) -> None:
            while time.monotonic() < stop:
                key = PREFIX + b"%d/%d" % (os.getpid(), c)
                value = STAMP.pack(time.time()) + b"x" * 56
                try:
                    await put(kv_pb2.PutRequest(key=key, value=value), timeout=5)
                    done[0] += 1
                except Exception:  # a failed put counts nowhere; the point goes on
                    pass

        await asyncio.gather(*(client(c) for c in range(clients)))
        out.put(done[0])
        await ch.close()

    asyncio.run(main())


def point(system: str, watch_addrs: list[str], put_addr: str, args) -> dict:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    per_stream = args.watchers // args.streams
    streams_per_proc = [args.streams // args.receivers + (1 if i < args.streams % args.receivers else 0)
                        for i in range(args.receivers)]
    procs = [ctx.Process(target=receiver, args=(system, watch_addrs, s, per_stream, args.secs, ready, go, out))
             for s in streams_per_proc]
    writers = [ctx.Process(target=writer, args=(system, put_addr, args.clients // args.writers, args.secs,
                                                ready, go, out)) for _ in range(args.writers)]
    for p in procs + writers:
        p.start()
    for _ in procs + writers:
        if not ready.acquire(timeout=120):
            raise TimeoutError(f"{system}: watchers or writers not ready")
    go.set()
    results = [out.get(timeout=args.secs + 120) for _ in procs + writers]
    for p in procs + writers:
        p.join(30)
    puts = sum(r for r in results if isinstance(r, int))
    events = sum(r[0] for r in results if isinstance(r, tuple))
    lat = sorted(x for r in results if isinstance(r, tuple) for x in r[1])
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    return {"system": system, "puts_s": puts / args.secs, "events_s": events / args.secs,
            "delivered": events / max(1, puts * per_stream * args.streams),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "samples": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=20, help="watch streams the watchers are spread over")
    ap.add_argument("--receivers", type=int, default=2, help="receiving processes")
    ap.add_argument("--clients", type=int, default=256, help="closed-loop writers")
    ap.add_argument("--writers", type=int, default=2, help="writing processes")
    ap.add_argument("--secs", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    from compare_etcd import ETCD_ENDPOINTS, Etcd

    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-fanout-") as d:
        etcd = Etcd(Path(d) / "etcd")
        (Path(d) / "etcd").mkdir()
        kv = LocalCluster.with_free_ports(str(Path(d) / "kv"))
        etcd.start()
        kv.start()
        try:
            etcd.wait_healthy(60)
            leader = kv.wait_for_leader(60)
            for r in range(args.rounds):
                for system in (("etcd", "kvstore") if r % 2 == 0 else ("kvstore", "etcd")):
                    if system == "etcd":
                        row = point("etcd", list(ETCD_ENDPOINTS), ETCD_ENDPOINTS[0], args)
                    else:
                        leader = kv.wait_for_leader(60)
                        row = point("kvstore", kv.endpoints, kv.client_addr(leader), args)
                    rows.append(row)
                    print(f"round {r + 1} {system:>7}: {row['puts_s']:>8,.0f} puts/s  {row['events_s']:>10,.0f} "
                          f"events/s delivered ({100 * row['delivered']:.0f}% of puts x watchers)  write-to-delivery "
                          f"p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms", flush=True)
        finally:
            kv.stop()
            etcd.stop()
    for system in ("etcd", "kvstore"):
        mine = [r for r in rows if r["system"] == system]
        print(f"{system:>7} median: {statistics.median(r['events_s'] for r in mine):,.0f} events/s, "
              f"{statistics.median(r['puts_s'] for r in mine):,.0f} puts/s, "
              f"p99 write-to-delivery {statistics.median(r['p99_ms'] for r in mine):.1f} ms "
              f"({args.watchers} watchers, {args.clients} writers)")


if __name__ == "__main__":
    main()
