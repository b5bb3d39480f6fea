"""`kvstore bench`: closed-loop load through AsyncClient, a live bar, a table.

The load shape is the one ../shared/bench/etcd_load.py puts on etcd, so the
two lines can be read as a ratio: N logical clients, each with exactly one
request in flight (send, wait, send again); 256-byte values; keys
``b"k%08d"`` uniform over 100,000; a latency measured around every call
(from after the key is chosen to the answer, as etcd_load.py does).

The clients are spread over several processes, one AsyncClient each (as
etcd_load.py spreads them over one channel per process), so the load
generator's own CPU does not serialize on one GIL and starve the run. Every
process opens its channels and finds the leader before a shared barrier, so
connection set-up is never inside the measured window.

Statistics: the rate is successful calls over the measured window; the
percentiles are nearest-rank (``sorted[min(n-1, int(q*n))]``), the same rule
etcd_load.py uses.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import queue
import random
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterable, Sequence

import click

if TYPE_CHECKING:
    from kvstore.client.tls import TLS

__all__ = [
    "OPS",
    "DEFAULT_CLIENTS",
    "LoadSpec",
    "Stats",
    "percentile",
    "summarize",
    "run_load",
    "results_table",
    "format_line",
    "bench",
]

#: put; get (linearizable, ReadIndex at the leader); sget (serializable, any
#: member); mix = half puts, half linearizable gets (YCSB workload A's ratio).
OPS: tuple[str, ...] = ("put", "get", "sget", "mix")
DEFAULT_CLIENTS: tuple[int, ...] = (1, 16, 128, 256)
MIX_PUT_FRACTION = 0.5
DEFAULT_ENDPOINTS = "127.0.0.1:2379,127.0.0.1:2479,127.0.0.1:2579"
#: How long a worker may take to connect and warm up before the run is abandoned.
START_TIMEOUT_S = 60.0


def default_procs() -> int:
    """One load process per core, at least two: fewer starves the generator, more only adds switching."""
    return max(2, os.cpu_count() or 2)


@dataclass(frozen=True)
class LoadSpec:
    """One measured point: an op, a number of closed-loop clients, a duration."""

    endpoints: tuple[str, ...]
    op: str = "put"
    clients: int = 16
    secs: float = 10.0
    procs: int = 2
    value_size: int = 256
    nkeys: int = 100_000
    coalesce: bool = True
    timeout: float = 5.0  # per call, retries included
    transport: str = "stream"  # the client's: one session stream per member, or "unary" RPCs
    tls: TLS | None = None  # members serving TLS: the CA to trust and the client certificate
    #: One blocking ``Client`` per process, one thread per logical client (what a
    #: threaded application sees, the thread hand-off included), instead of
    #: coroutines on one AsyncClient.
    blocking: bool = False
    user: str | None = None  # auth enabled: who the load runs as
    password: str | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {self.op!r}")
        if self.clients < 1 or self.procs < 1 or self.secs <= 0 or self.nkeys < 1:
            raise ValueError("need clients >= 1, procs >= 1, secs > 0, nkeys >= 1")

    def split(self) -> list[int]:
        """Clients per process: as even as possible, never an idle process."""
        procs = min(self.procs, self.clients)
        base, extra = divmod(self.clients, procs)
        return [base + (1 if i < extra else 0) for i in range(procs)]


@dataclass
class Stats:
    """What one point measured. Latencies in milliseconds."""

    op: str
    clients: int
    procs: int
    coalesce: bool
    ops: int
    errors: int
    elapsed: float
    rate: float
    p50: float
    p99: float
    p999: float
    first_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_lat: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 1]); NaN when empty.

    Same rule as etcd_load.py, so the two sides' p99 mean the same thing.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be within [0, 1]")
    n = len(sorted_lat)
    if n == 0:
        return float("nan")
    return sorted_lat[min(n - 1, int(q * n))]


def summarize(
    latencies_s: Iterable[float],
    elapsed_s: float,
    *,
    op: str = "put",
    clients: int = 1,
    procs: int = 1,
    coalesce: bool = True,
    errors: int = 0,
    first_error: str = "",
) -> Stats:
    """Successful-call latencies (seconds) over a measured window -> rate and ms percentiles."""
    lat = sorted(latencies_s)
    ops = len(lat)
    rate = ops / elapsed_s if elapsed_s > 0 else 0.0
    ms = lambda q: percentile(lat, q) * 1e3  # noqa: E731
    return Stats(
        op=op, clients=clients, procs=procs, coalesce=coalesce, ops=ops, errors=errors,
        elapsed=elapsed_s, rate=rate, p50=ms(0.50), p99=ms(0.99), p999=ms(0.999), first_error=first_error,
    )


# --- the load processes -----------------------------------------------------


async def _drive(spec: LoadSpec, nclients: int, slot: int, ready: Any, go: Any, counts: Any) -> dict[str, Any]:
    """One process's share: connect, warm up, wait for the others, run closed loops until the deadline."""
    from kvstore.client import AsyncClient

    value = os.urandom(spec.value_size)
    lat = array("d")
    errors = 0
    first_error = ""
    nkeys, op = spec.nkeys, spec.op
    loop = asyncio.get_running_loop()
    async with AsyncClient(
        list(spec.endpoints), coalesce=spec.coalesce, timeout=spec.timeout, transport=spec.transport, tls=spec.tls,
        user=spec.user, password=spec.password,
    ) as kv:
        # Find the leader and open a channel to every member a read may go to.
        await kv.put(b"warm", b"x")
        for _ in range(2 * len(spec.endpoints)):
            await kv.get(b"warm", serializable=True)
        ready.put(slot)
        if not await loop.run_in_executor(None, go.wait, START_TIMEOUT_S):
            raise TimeoutError("no start signal from the parent")
        perf = time.perf_counter
        co = kv.coalescer
        rpcs0, ops0 = (co.rpcs, co.ops) if co is not None else (0, 0)
        cpu0 = time.process_time()
        t0 = perf()
        deadline = t0 + spec.secs

        # Per-op bookkeeping is taken from the servers' cores too, so keep it
        # small: keys are built once, drawn with the C-level random() (uniform
        # over [0, nkeys) like randrange, at a tenth of the cost), and the
        # latency clock starts after the key is chosen, as in etcd_load.py.
        keys = [b"k%08d" % i for i in range(nkeys)]
        put, get = kv.put, kv.get
        sget = op == "sget"

        async def client() -> None:
            nonlocal errors, first_error
            rand = random.random
            append = lat.append
            while True:
                k = keys[int(rand() * nkeys)]
                t = perf()
                if t >= deadline:
                    return
                try:
                    if op == "put" or (op == "mix" and rand() < MIX_PUT_FRACTION):
                        await put(k, value)
                    else:
                        await get(k, serializable=sget)
                except Exception as e:  # counted, not fatal: a failover mid-run is a figure too
                    errors += 1
                    if not first_error:
                        first_error = f"{type(e).__name__}: {e}"[:200]
                    continue
                append(perf() - t)

        async def report() -> None:
            while True:
                counts[slot] = len(lat)
                await asyncio.sleep(0.1)

        reporter = asyncio.create_task(report())
        await asyncio.gather(*(client() for _ in range(nclients)))
        elapsed = perf() - t0
        cpu = time.process_time() - cpu0  # every thread of this process, gRPC's included
        rpcs, batched = (co.rpcs - rpcs0, co.ops - ops0) if co is not None else (0, 0)
        reporter.cancel()
        counts[slot] = len(lat)
    return {"lat": lat.tobytes(), "errors": errors, "first_error": first_error, "elapsed": elapsed, "cpu": cpu,
            "rpcs": rpcs, "batched": batched}


def _drive_threads(spec: LoadSpec, nclients: int, slot: int, ready: Any, go: Any, counts: Any) -> dict[str, Any]:
    """`_drive` for the blocking Client: one thread per logical client, all sharing one Client."""
    import threading

    from kvstore.client import Client

    value = os.urandom(spec.value_size)
    nkeys, op = spec.nkeys, spec.op
    keys = [b"k%08d" % i for i in range(nkeys)]
    lats = [array("d") for _ in range(nclients)]
    errors = [0] * nclients
    first_errors = [""] * nclients
    with Client(list(spec.endpoints), coalesce=spec.coalesce, timeout=spec.timeout, transport=spec.transport,
                tls=spec.tls, user=spec.user, password=spec.password) as kv:
        kv.put(b"warm", b"x")
        for _ in range(2 * len(spec.endpoints)):
            kv.get(b"warm", serializable=True)
        ready.put(slot)
        if not go.wait(START_TIMEOUT_S):
            raise TimeoutError("no start signal from the parent")
        co = kv.async_client.coalescer
        rpcs0, ops0 = (co.rpcs, co.ops) if co is not None else (0, 0)
        perf = time.perf_counter
        cpu0 = time.process_time()
        t0 = perf()
        deadline = t0 + spec.secs
        sget = op == "sget"

        def client(i: int) -> None:
            rnd = random.Random(i).random  # one generator per thread: no lock shared between callers
            append, put, get = lats[i].append, kv.put, kv.get
            while True:
                k = keys[int(rnd() * nkeys)]
                t = perf()
                if t >= deadline:
                    return
                try:
                    if op == "put" or (op == "mix" and rnd() < MIX_PUT_FRACTION):
                        put(k, value)
                    else:
                        get(k, serializable=sget)
                except Exception as e:  # counted, not fatal, as in _drive
                    errors[i] += 1
                    if not first_errors[i]:
                        first_errors[i] = f"{type(e).__name__}: {e}"[:200]
                    continue
                append(perf() - t)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(nclients)]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            counts[slot] = sum(len(x) for x in lats)
            threads[0].join(0.1)
        elapsed = perf() - t0
        cpu = time.process_time() - cpu0
        rpcs, batched = (co.rpcs - rpcs0, co.ops - ops0) if co is not None else (0, 0)
    lat = array("d")
    for x in lats:
        lat.extend(x)
    counts[slot] = len(lat)
    first = next((e for e in first_errors if e), "")
    return {"lat": lat.tobytes(), "errors": sum(errors), "first_error": first, "elapsed": elapsed, "cpu": cpu,
            "rpcs": rpcs, "batched": batched}


def _worker(spec: LoadSpec, nclients: int, slot: int, ready: Any, go: Any, counts: Any, results: Any) -> None:
    """Process entry point (spawned: no gRPC state inherited from the parent)."""
    try:
        if spec.blocking:
            res = _drive_threads(spec, nclients, slot, ready, go, counts)
        else:
            try:
                import uvloop

                run: Callable[[Any], Any] = uvloop.run
            except ImportError:
                run = asyncio.run
            res = run(_drive(spec, nclients, slot, ready, go, counts))
    except BaseException as e:  # report instead of dying silently: the parent waits for every slot
        res = {"fatal": f"{type(e).__name__}: {e}"[:500]}
    results.put((slot, res))


def _wait_ready(ready: Any, procs: list[Any], n: int) -> bool:
    """Until every worker has warmed up (True), or one died or START_TIMEOUT_S passed (False)."""
    seen = 0
    deadline = time.monotonic() + START_TIMEOUT_S
    while seen < n and time.monotonic() < deadline:
        try:
            ready.get(timeout=0.2)
            seen += 1
        except queue.Empty:
            if not all(p.is_alive() for p in procs):
                return False
    return seen == n


ProgressFn = Callable[[float, int], None]  # (seconds elapsed, ops completed so far)


def run_load(spec: LoadSpec, on_progress: ProgressFn | None = None) -> Stats:
    """Run one point in ``spec.procs`` spawned processes and merge what they measured."""
    ctx = mp.get_context("spawn")
    shares = spec.split()
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    counts = ctx.Array("q", len(shares), lock=False)
    procs = [
        ctx.Process(target=_worker, args=(spec, n, i, ready, go, counts, results), daemon=True)
        for i, n in enumerate(shares)
    ]
    for p in procs:
        p.start()
    try:
        started = _wait_ready(ready, procs, len(shares))
        go.set()  # also when not started: the healthy workers then run and exit on their own
        t0 = time.perf_counter()
        if started and on_progress is not None:
            while time.perf_counter() - t0 < spec.secs:
                on_progress(time.perf_counter() - t0, sum(counts))
                time.sleep(0.2)
        out: dict[int, dict[str, Any]] = {}
        wait_until = time.monotonic() + spec.secs + spec.timeout + START_TIMEOUT_S
        while len(out) < len(shares) and time.monotonic() < wait_until:
            try:
                slot, res = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            out[slot] = res
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    fatal = [r["fatal"] for r in out.values() if "fatal" in r]
    if fatal or len(out) < len(shares):
        raise RuntimeError(f"load process failed: {fatal[0] if fatal else 'no result'}")
    lat = array("d")
    for r in out.values():
        lat.frombytes(r["lat"])
    errs = [r["first_error"] for r in out.values() if r["first_error"]]
    if on_progress is not None:
        on_progress(spec.secs, len(lat))
    stats = summarize(
        lat, max(r["elapsed"] for r in out.values()), op=spec.op, clients=spec.clients, procs=len(shares),
        coalesce=spec.coalesce, errors=sum(r["errors"] for r in out.values()), first_error=errs[0] if errs else "",
    )
    # The load processes share the cores with the members: what they burn per
    # op is taken from the servers, so it is reported next to the rate.
    stats.extra["transport"] = spec.transport
    stats.extra["blocking"] = spec.blocking
    stats.extra["client_cpu_s"] = cpu = sum(r["cpu"] for r in out.values())
    stats.extra["client_cpu_us_per_op"] = cpu / len(lat) * 1e6 if len(lat) else float("nan")
    rpcs = sum(r["rpcs"] for r in out.values())
    if rpcs:  # coalesced: how many ops each RPC carried (the client's and the servers' per-RPC cost is shared by them)
        stats.extra["ops_per_rpc"] = sum(r["batched"] for r in out.values()) / rpcs
    return stats


# --- presentation -------------------------------------------------------------


def _ms(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"  # NaN -> "-"


def format_line(s: Stats) -> str:
    """One line in etcd_load.py's format (plus p99.9 and the client's CPU per op when known), for logs and diffs."""
    line = (f"{s.op} ops={s.ops} rate={s.rate:.0f}/s p50={_ms(s.p50)}ms p99={_ms(s.p99)}ms "
            f"p99.9={_ms(s.p999)}ms clients={s.clients} errors={s.errors}")
    cpu = s.extra.get("client_cpu_us_per_op")
    if cpu is not None:
        line += f" client_cpu={cpu:.1f}us/op"
    if "ops_per_rpc" in s.extra:
        line += f" ops/rpc={s.extra['ops_per_rpc']:.0f}"
    return line


def results_table(stats: Sequence[Stats], title: str = "kvstore bench") -> Any:
    """A rich Table of measured points."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("op", "clients", "coalesce"):
        t.add_column(col)
    for col in ("ops/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"):
        t.add_column(col, justify="right")
    for s in stats:
        t.add_row(s.op, str(s.clients), "on" if s.coalesce else "off", f"{s.rate:,.0f}",
                  _ms(s.p50), _ms(s.p99), _ms(s.p999), str(s.errors))
    return t


def run_points(specs: Sequence[LoadSpec], console: Any = None) -> list[Stats]:
    """Run points one after another under a live progress bar (ops/s so far)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console()
    out: list[Stats] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for spec in specs:
            label = (f"{spec.op:<4} x{spec.clients:<4} {'coalesced' if spec.coalesce else 'one op':<9} {spec.transport}"
                     + (" blocking" if spec.blocking else ""))
            task = progress.add_task(label, total=spec.secs, rate="")

            def tick(elapsed: float, done: int, task: Any = task, secs: float = spec.secs) -> None:
                rate = done / elapsed if elapsed > 0 else 0.0
                progress.update(task, completed=min(elapsed, secs), rate=f"{rate:>9,.0f} ops/s")

            s = run_load(spec, tick)
            progress.update(task, completed=spec.secs, rate=f"{s.rate:>9,.0f} ops/s")
            out.append(s)
    return out


def _csv_list(value: str, conv: Callable[[str], Any]) -> list[Any]:
    return [conv(v.strip()) for v in value.split(",") if v.strip()]


@click.command("bench")
@click.option("--endpoints", default=DEFAULT_ENDPOINTS, show_default=True,
              help="client addresses of the cluster's members, comma-separated")
@click.option("--ops", default=",".join(OPS), show_default=True,
              help="comma-separated: put, get (linearizable), sget (serializable), mix (50% put / 50% get)")
@click.option("--clients", default=",".join(map(str, DEFAULT_CLIENTS)), show_default=True,
              help="comma-separated numbers of closed-loop clients (one request in flight each)")
@click.option("--secs", type=float, default=10.0, show_default=True, help="measured seconds per point")
@click.option("--procs", type=int, default=default_procs(), show_default=True,
              help="load-generating processes (one AsyncClient each)")
@click.option("--value-size", type=int, default=256, show_default=True, help="bytes per value")
@click.option("--keys", "nkeys", type=int, default=100_000, show_default=True, help="key space (uniform)")
@click.option("--coalesce/--no-coalesce", default=True, show_default=True,
              help="let the client gather concurrent calls into Batch RPCs")
@click.option("--transport", type=click.Choice(["stream", "unary"]), default="stream", show_default=True,
              help="one session stream per member, or one unary RPC per call")
@click.option("--blocking", is_flag=True, default=False,
              help="one blocking Client per process with a thread per client, instead of coroutines on an AsyncClient")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="also write every point as one JSON object per line")
@click.option("--cacert", envvar="KVSTORE_CACERT", default=None, help="TLS: trust the CA in this PEM file")
@click.option("--cert", envvar="KVSTORE_CERT", default=None, help="TLS: client certificate (PEM)")
@click.option("--key", envvar="KVSTORE_KEY", default=None, help="TLS: key of --cert (PEM)")
def bench(endpoints: str, ops: str, clients: str, secs: float, procs: int, value_size: int, nkeys: int,
          coalesce: bool, transport: str, blocking: bool, json_path: str | None, cacert: str | None, cert: str | None,
          key: str | None) -> None:
    """Closed-loop load against a running cluster: ops/s, p50, p99, p99.9 per op and client count.

    With auth enabled, run it as a user: `kvstore --user NAME[:PASSWORD] bench ...`.
    """
    from rich.console import Console

    from kvstore.auth_cli import credentials
    from kvstore.client.tls import TLS

    root = click.get_current_context().find_root()
    user, password = credentials((root.obj or {}).get("user"))
    try:
        tls = TLS(ca=cacert, cert=cert, key=key) if (cacert or cert or key) else None
        op_list = _csv_list(ops, str)
        client_list = _csv_list(clients, int)
        specs = [LoadSpec(tuple(_csv_list(endpoints, str)), op, n, secs, procs, value_size, nkeys, coalesce,
                          transport=transport, tls=tls, blocking=blocking, user=user, password=password)
                 for op in op_list for n in client_list]
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    console = Console()
    try:
        stats = run_points(specs, console)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    console.print(results_table(stats))
    for s in stats:
        if s.errors:
            console.print(f"[yellow]{s.op} x{s.clients}: {s.errors} errors, first: {s.first_error}")
    if json_path:
        with open(json_path, "w") as f:
            for s in stats:
                f.write(json.dumps(s.as_dict()) + "\n")


if __name__ == "__main__":
    bench()
