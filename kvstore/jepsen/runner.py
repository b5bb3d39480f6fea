"""One Jepsen run: cluster up, workers + nemesis for a while, heal, final reads, verdict.

The run directory holds everything a person needs afterwards::

    history.jsonl   every client call (the checker's schema)
    faults.jsonl    every fault window the nemesis opened and closed
    verdict.json    valid or not, and why (the checker's explanation)
    summary.json    ops by outcome and function, faults, leader changes, timings
    report.html     a self-contained timeline to open in a browser
    logs/nodeK.log  each node's output

Networks: ``netns`` (root: each node in its own namespace, partitions by
iptables, see :mod:`kvstore.jepsen.net`) or ``proxy`` (no root: every peer link
through a TCP proxy that resets connections during a partition, see
:mod:`kvstore.jepsen.proxy`). ``auto`` picks netns when it can.

In netns mode the *calling thread* moves into the harness's control namespace
for the run, before any gRPC channel exists (gRPC's threads inherit it); run
it from a fresh process, as ``kvstore jepsen run`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvstore.jepsen import net as netns
from kvstore.jepsen.clock import NodeClocks, uses_clock
from kvstore.jepsen.history import FAIL, INFO, INVOKE, OK
from kvstore.jepsen.nemesis import Nemesis, parse_spec
from kvstore.jepsen.power import PowerSupply, needs_power
from kvstore.jepsen.recorder import Recorder
from kvstore.jepsen.workloads import Op, Store, Verdict, Workload, make_workload

VALID, INVALID, UNKNOWN = 0, 1, 2  # exit codes


@dataclass
class RunConfig:
    nodes: int = 3
    time: float = 60.0                 # seconds of workload under faults
    nemesis: str = "partition"
    workload: str = "register"
    out: str = "runs"
    concurrency: int = 0               # client workers; 0 = 2 per node
    rate: float = 100.0                # total ops/s cap across workers (0 = unlimited)
    fault_seconds: float = 5.0
    heal_seconds: float = 5.0
    op_timeout: float = 1.0            # total per call, retries included; then info
    network: str = "auto"              # auto | netns | proxy
    server_args: list[str] = field(default_factory=list)
    seed: int | None = None
    tick_ms: int = 50                  # faster elections make short runs meaningful
    election_ticks: int = 10
    keep_data: bool = False
    name: str = ""
    tls: bool = False                  # client TLS (client certificates) and mutual peer TLS
    auth: bool = False                 # auth enabled; clients run as a non-root user (JEPSEN_USER)


@dataclass
class RunResult:
    run_dir: Path
    verdict: Verdict
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        if self.verdict.unknown:
            return UNKNOWN
        return VALID if self.verdict.valid else INVALID


# ------------------------------------------------------------------ the store

class ClientStore(Store):
    """The workloads' Store over the real AsyncClient, with short deadlines."""

    def __init__(self, endpoints: list[str], timeout: float, tls: Any = None,
                 credentials: tuple[str, str] | None = None) -> None:
        from kvstore.client import AsyncClient, ExponentialBackoff

        retry = ExponentialBackoff(base=0.02, cap=0.2, attempt_timeout=min(1.0, timeout))
        user, password = credentials or (None, None)
        self.client = AsyncClient(endpoints, timeout=timeout, retry=retry, coalesce=False, tls=tls, user=user,
                                  password=password)
        self._releases: set[asyncio.Future] = set()  # locks being released in the background

    async def get(self, key: str) -> str | None:
        value = (await self.client.get(key)).value
        return None if value is None else value.decode()

    async def put(self, key: str, value: str) -> None:
        await self.client.put(key, value)

    async def cas(self, key: str, expected: str, new: str) -> bool:
        from kvstore.client.txn import Txn, put, value

        return (await self.client.txn(Txn().when(value(key) == expected).then(put(key, new)))).succeeded

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        result = await self.client.range(prefix, prefix=True)
        return {kv.key.decode(): kv.value.decode() for kv in result.kvs}

    async def swap(self, expected: dict[str, str], new: dict[str, str]) -> bool:
        from kvstore.client.txn import Txn, put, value

        txn = Txn().when(*(value(k) == v for k, v in expected.items())).then(
            *(put(k, v) for k, v in new.items()))
        return (await self.client.txn(txn)).succeeded

    async def grant(self, ttl: int) -> tuple[int, int]:
        granted = await self.client.lease_grant(ttl)
        return granted.id, granted.ttl

    async def put_leased(self, key: str, value: str, lease: int) -> None:
        await self.client.put(key, value, lease=lease)

    async def keep_alive(self, lease: int) -> int:
        return int((await self.client.lease_keep_alive_once(lease)).TTL)

    async def locked_increment(self, lock: str, counter: str, ttl: int, hold_s: float, fenced: bool,
                               acquire_timeout: float) -> tuple[int, int] | str:
        """Take the lock, read the counter, hold, then write count + 1 blindly (fenced by the lock's
        guard unless told not to). (count, token) if written, else why it certainly was not: "lock"
        (not acquired, or the counter not read) or "fence" (the guard refused the write)."""
        from kvstore.client import errors
        from kvstore.client.lock import Lock
        from kvstore.client.txn import Txn, put
        from kvstore.jepsen.lock_workload import parse_counter

        lk = Lock(self.client, lock, ttl=ttl)
        try:
            await lk.acquire(acquire_timeout)
        except errors.KvstoreError:
            return "lock"  # not acquired: nothing was written to the counter
        try:
            try:
                count, _ = parse_counter(await self.get(counter))
            except errors.KvstoreError:
                return "lock"
            if hold_s < 0:  # a stalled holder: its keep-alives stop too, its lease runs out
                assert lk.lease is not None
                await lk.lease.stop_keep_alive()
            await asyncio.sleep(abs(hold_s))
            txn = Txn().when(lk.guard()) if fenced else Txn()
            r = await self.client.txn(txn.then(put(counter, f"{count + 1} {lk.token}")))
            return (count + 1, lk.token) if r.succeeded else "fence"
        finally:
            # in the background: the increment is decided, and a release may wait out a fault
            task = asyncio.ensure_future(_quietly(lk.release()))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    def outcome_of(self, error: BaseException, mutation: bool) -> str:
        return outcome_of(error, mutation)

    async def put_revision(self, key: str, value: str) -> int:
        return (await self.client.put(key, value)).revision

    async def watch(self, prefix: str, start: int, max_events: int, seconds: float) -> tuple[list, str]:
        """Events [revision, key, value, type] of a prefix watch from `start`, until max_events or
        `seconds` pass; and how it ended ("" or the error that ended it)."""
        events: list = []
        stream = self.client.watch(prefix, prefix=True, start_revision=start)

        async def collect() -> None:
            async for ev in stream:
                events.append([ev.revision, ev.key.decode(), ev.value.decode(), ev.type])
                if len(events) >= max_events:
                    return

        ended = ""
        try:
            await asyncio.wait_for(collect(), seconds)
        except TimeoutError:
            pass
        except Exception as e:  # the stream's own error: what it got so far still counts
            ended = f"{type(e).__name__}: {e}"
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return events, ended

    async def history(self, prefix: str) -> list:
        """Every event under `prefix` from revision 1 to the current revision (one watch)."""
        upto = (await self.client.range(prefix, prefix=True, count_only=True)).revision
        events: list = []
        async for ev in self.client.watch(prefix, prefix=True, start_revision=1, progress_notify=False):
            events.append([ev.revision, ev.key.decode(), ev.value.decode(), ev.type])
            if ev.revision >= upto:
                break
        return events

    async def close(self) -> None:
        await self.client.close()


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await aw


def outcome_of(error: BaseException, mutation: bool) -> str:
    """fail when the call certainly had no effect, info when it may have had one."""
    if not mutation:
        return FAIL  # a read changes nothing, whatever happened to it
    from kvstore.client import errors

    maybe = getattr(error, "maybe_applied", None)
    if maybe is not None:
        return INFO if maybe else FAIL
    if isinstance(error, errors.InvalidArgument | errors.NotLeader | errors.NoLeader):
        return FAIL  # refused before anything was proposed
    return INFO


# ------------------------------------------------------------------ the nodes

class NodeProcesses:
    """The nemesis's hold on the node processes, over :class:`LocalCluster`.

    LocalCluster starts the real ``python -m kvstore.server.main`` processes
    (inside a namespace when asked); this adds what a fault schedule needs:
    idempotent kill / restart / pause / resume, and "everything back up" at heal.
    """

    def __init__(self, cluster: Any, power: PowerSupply | None = None, clocks: NodeClocks | None = None) -> None:
        self.cluster = cluster
        self.power = power  # each member's disk and boot id, when the nemesis cuts power
        self.paused: set[int] = set()
        self.starts: Counter[int] = Counter()
        self.clocks = clocks  # each node's wall-clock offset, when they run with the clock shim
        self._lock = threading.Lock()

    @property
    def nodes(self) -> list[int]:
        return list(self.cluster.ids)

    def start(self, node: int) -> None:
        with self._lock:
            if not self.cluster.is_running(node):
                if self.power is not None:
                    if not self.power.powered(node):
                        return  # a machine without power does not boot: restore_power starts it
                    self.cluster.node_env[node] = {**self.cluster.node_env.get(node, {}), **self.power.env(node)}
                self.starts[node] += 1
                self.cluster.start_node(node)
            self.paused.discard(node)

    def kill(self, node: int) -> None:
        with self._lock:
            self.cluster.kill(node)
            self.paused.discard(node)

    def pause(self, node: int) -> None:
        with self._lock:
            if self.cluster.is_running(node):
                self.cluster.pause(node)
                self.paused.add(node)

    def resume(self, node: int) -> None:
        with self._lock:
            self.cluster.resume(node)
            self.paused.discard(node)

    def cut_power(self, nodes: list[int]) -> None:
        if self.power is None:
            raise RuntimeError("power cuts need the members' disks (the runner makes them for a power nemesis)")
        with self._lock:
            self.power.cut(nodes, self.cluster.kill)
            self.paused.difference_update(nodes)

    def restore_power(self, nodes: list[int]) -> None:
        assert self.power is not None
        with self._lock:
            self.power.restore(nodes)
        for node in nodes:
            self.start(node)

    def alive(self, node: int) -> bool:
        return self.cluster.is_running(node)

    def heal_all(self) -> None:
        """Every node running and not paused (after the nemesis, before final reads)."""
        for node in self.nodes:
            self.resume(node)
            self.start(node)

    def stop_all(self) -> None:
        self.cluster.stop()

    def crashed(self) -> list[int]:
        """Nodes that exited on their own (not killed by us): a server bug worth reporting."""
        import signal

        return [i for i, p in self.cluster.procs.items()
                if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM)]


def make_cluster(base_dir: Path, nodes: int, config: RunConfig, *, client_addrs: dict[int, str],
                 peer_addrs: dict[int, str], netns: dict[int, str] | None = None,
                 node_args: dict[int, list[str]] | None = None,
                 node_env: dict[int, dict[str, str]] | None = None) -> Any:
    from kvstore.launcher import LocalCluster

    extra = ["--tick-ms", str(config.tick_ms), "--election-ticks", str(config.election_ticks),
             *config.server_args]
    certs = None
    if config.tls:  # certificates naming every address a member is dialled on
        from kvstore.certs import init

        hosts = sorted({a.rsplit(":", 1)[0] for a in [*client_addrs.values(), *peer_addrs.values()]})
        certs = init(str(base_dir / "tls"), nodes, hosts=hosts)
    return LocalCluster(str(base_dir), nodes, extra_args=extra, client_addrs=client_addrs,
                        peer_addrs=peer_addrs, netns=netns, node_args=node_args, node_env=node_env,
                        certs=certs)


# -------------------------------------------------------------- leader watch

class LeaderWatch:
    """Polls every node's Status, so the nemesis can aim at the leader and the
    summary can count leader changes (a new term with a known leader)."""

    def __init__(self, client_addrs: dict[int, str], clock: Any, interval: float = 0.1, tls: Any = None) -> None:
        self.client_addrs = client_addrs
        self.tls = tls
        self.clock = clock
        self.interval = interval
        self.current: int | None = None
        self.terms: dict[int, int] = {}           # term -> leader node
        self.timeline: list[dict[str, Any]] = []  # leader changes: time, node, term
        self._id_to_node: dict[int, int] = {}

    def leader(self) -> int | None:
        return self.current

    @property
    def changes(self) -> int:
        return max(0, len(self.timeline) - 1)

    async def run(self, stop: asyncio.Event) -> None:
        import grpc

        from kvstore.v1 import cluster_pb2, cluster_pb2_grpc

        options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 300)]
        channels = {n: grpc.aio.insecure_channel(a, options=options) if self.tls is None
                    else grpc.aio.secure_channel(a, self.tls.credentials(), options=options)
                    for n, a in self.client_addrs.items()}
        stubs = {n: cluster_pb2_grpc.ClusterStub(c) for n, c in channels.items()}

        async def status(node: int) -> Any:
            try:
                return await stubs[node].Status(cluster_pb2.StatusRequest(), timeout=0.3)
            except (TimeoutError, grpc.aio.AioRpcError):
                return None

        try:
            while not stop.is_set():
                answers = await asyncio.gather(*(status(n) for n in stubs))
                self.observe({n: a for n, a in zip(stubs, answers) if a is not None})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            for channel in channels.values():
                await channel.close()

    def observe(self, answers: dict[int, Any]) -> None:
        for node, answer in answers.items():
            if answer.member_id:
                self._id_to_node[answer.member_id] = node
        leaders = [(a.term, node) for node, a in answers.items() if a.role == "leader"]
        if not leaders:
            # Nobody answering claims leadership: keep the last one only if a
            # majority still names it (else it is gone: paused, killed, deposed).
            named = Counter(self._id_to_node.get(a.leader_id) for a in answers.values() if a.leader_id)
            best = named.most_common(1)
            if not best or best[0][1] * 2 <= len(self.client_addrs):
                self.current = None
            return
        term, node = max(leaders)
        self.current = node
        if term not in self.terms:
            self.terms[term] = node
            self.timeline.append({"time": self.clock(), "node": node, "term": term})


# ----------------------------------------------------------------- the run

class _Control:
    """What the nemesis acts through: node processes, the network, the leader watch."""

    def __init__(self, procs: NodeProcesses, network: Any, watch: LeaderWatch, membership: Any = None) -> None:
        self.procs, self.network, self.watch = procs, network, watch
        self.nodes = procs.nodes
        self.membership = membership  # the member nemesis's changes (kvstore.jepsen.member)

    def leader(self) -> int | None:
        return self.watch.leader()

    def kill(self, node: int) -> None:
        self.procs.kill(node)

    def restart(self, node: int) -> None:
        self.procs.start(node)

    def pause(self, node: int) -> None:
        self.procs.pause(node)

    def resume(self, node: int) -> None:
        self.procs.resume(node)

    def cut_power(self, nodes: list[int]) -> None:
        self.procs.cut_power(nodes)

    def restore_power(self, nodes: list[int]) -> None:
        self.procs.restore_power(nodes)

    def partition(self, grudge: dict[int, set[int]]) -> None:
        self.network.partition(grudge)

    def heal_network(self) -> None:
        self.network.heal()

    def skew_clock(self, node: int, seconds: int) -> None:
        if self.procs.clocks is None:
            raise RuntimeError("the nodes were not started with the clock shim")
        self.procs.clocks.set(node, seconds)


def choose_network(requested: str) -> str:
    if requested == "auto":
        return "netns" if netns.netns_supported() is None else "proxy"
    if requested == "netns":
        why = netns.netns_supported()
        if why:
            raise RuntimeError(f"--network netns: {why}")
    elif requested != "proxy":
        raise ValueError(f"unknown network {requested!r}: auto, netns or proxy")
    return requested


def make_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = config.name or f"{stamp}-{config.workload}-{config.nemesis.replace(',', '_').replace('+', '-')}"
    run_dir = Path(config.out) / name
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(config.out) / f"{name}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def run(config: RunConfig) -> RunResult:
    """Run one test end to end; always tears down processes and network."""
    if config.seed is None:
        config.seed = random.randrange(1 << 31)
    mode = choose_network(config.network)
    run_dir = make_run_dir(config)
    data_root = Path(tempfile.mkdtemp(prefix="kvj-data-"))
    nodes = list(range(1, config.nodes + 1))
    disks = contextlib.ExitStack()
    try:
        # Power cuts need each member's data dir on its own disk (unmounted before the cleanup below).
        power = disks.enter_context(PowerSupply(data_root, nodes)) if needs_power(parse_spec(config.nemesis)) else None
        clocks = NodeClocks(data_root / "clocks", nodes) if uses_clock(config.nemesis) else None
        node_env = {n: clocks.env(n) for n in nodes} if clocks else None
        if mode == "netns":
            with netns.NamespaceNetwork(config.nodes) as network:
                # Every node has its own address, so all can use the same ports.
                client_addrs = {n: f"{network.ip(n)}:2379" for n in nodes}
                cluster = make_cluster(data_root, config.nodes, config, client_addrs=client_addrs,
                                       peer_addrs={n: f"{network.ip(n)}:2380" for n in nodes},
                                       netns={n: network.namespace(n) for n in nodes}, node_env=node_env)
                with network.enter_control():
                    return _run_with(config, mode, run_dir, NodeProcesses(cluster, power, clocks), network,
                                     client_addrs)
        from kvstore.jepsen.proxy import ProxyNetwork

        with ProxyNetwork(nodes) as network:
            client_addrs = {n: f"127.0.0.1:{network.client_port(n)}" for n in nodes}
            # Each node reaches the others through its own proxies: a per-node
            # --initial-cluster (given last, so it wins over the shared one).
            node_args = {n: ["--initial-cluster", ",".join(
                f"{m}={a}" for m, a in sorted(network.peer_addrs_for(n).items()))] for n in nodes}
            cluster = make_cluster(data_root, config.nodes, config, client_addrs=client_addrs,
                                   peer_addrs={n: network.listen_peer_addr(n) for n in nodes},
                                   node_args=node_args, node_env=node_env)
            return _run_with(config, mode, run_dir, NodeProcesses(cluster, power, clocks), network, client_addrs)
    finally:
        disks.close()
        logs = run_dir / "logs"
        logs.mkdir(exist_ok=True)
        for log in data_root.glob("node*.log"):
            shutil.copy(log, logs / log.name)
        if config.keep_data:
            shutil.move(str(data_root), run_dir / "data")
        else:
            shutil.rmtree(data_root, ignore_errors=True)


def _run_with(config: RunConfig, mode: str, run_dir: Path, procs: NodeProcesses, network: Any,
              client_addrs: dict[int, str]) -> RunResult:
    try:
        return asyncio.run(_run_async(config, mode, run_dir, procs, network, client_addrs))
    finally:
        procs.stop_all()


async def _run_async(config: RunConfig, mode: str, run_dir: Path, procs: NodeProcesses,
                     network: Any, client_addrs: dict[int, str]) -> RunResult:
    started = time.monotonic()
    workload = make_workload(config.workload, config.seed)
    windows = parse_spec(config.nemesis)
    recorder = Recorder(run_dir / "history.jsonl", run_dir / "faults.jsonl")
    tls = procs.cluster.client_tls()
    watch = LeaderWatch(client_addrs, recorder.clock, tls=tls)
    stop_watch = asyncio.Event()
    watch_task = asyncio.create_task(watch.run(stop_watch))
    from kvstore.jepsen.member import Membership

    control = _Control(procs, network, watch, Membership(procs, client_addrs, tls))
    nemesis = Nemesis(control, windows, recorder, config.fault_seconds, config.heal_seconds,
                      seed=config.seed)
    endpoints = [client_addrs[n] for n in procs.nodes]
    concurrency = config.concurrency or 2 * config.nodes
    stores: list[ClientStore] = []
    timings: dict[str, float] = {}
    notes: list[str] = []
    try:
        for node in procs.nodes:
            procs.start(node)
        await _wait_for(lambda: watch.leader() is not None, 60, "a leader to be elected", procs)
        timings["cluster_up"] = time.monotonic() - started

        creds = None
        if config.auth:
            await _retry(lambda: enable_auth(endpoints, tls), 30, "enabling auth")
            creds = JEPSEN_USER
        setup_store = ClientStore(endpoints, timeout=5.0, tls=tls, credentials=creds)
        stores.append(setup_store)
        await _retry(lambda: workload.setup(setup_store), 30, "workload setup")

        # Each worker prefers its own node first (as Jepsen binds a client to a
        # node); the client still follows redirects to the leader.
        for slot in range(concurrency):
            first = slot % config.nodes
            stores.append(ClientStore(endpoints[first:] + endpoints[:first], config.op_timeout, tls, creds))
        nemesis.start()
        load_started = time.monotonic()
        deadline = load_started + config.time
        interval = concurrency / config.rate if config.rate > 0 else 0.0
        rng = random.Random(config.seed)
        await asyncio.gather(*(
            _worker(slot, concurrency, workload, stores[1 + slot], recorder, deadline, interval,
                    random.Random(rng.random()), 4 * config.op_timeout + 1)
            for slot in range(concurrency)))
        timings["workload"] = time.monotonic() - load_started

        await asyncio.to_thread(nemesis.stop)
        notes.extend(nemesis.errors)
        procs.heal_all()
        network.heal()
        await _wait_for(lambda: watch.leader() is not None and all(procs.alive(n) for n in procs.nodes),
                        60, "the healed cluster to elect a leader", procs)
        await asyncio.sleep(1.0)  # let restarted nodes catch up before the final reads
        final_store = ClientStore(endpoints, timeout=5.0, tls=tls, credentials=creds)
        stores.append(final_store)
        await _final_reads(workload, final_store, recorder, 10_000_000)
    finally:
        await asyncio.to_thread(nemesis.stop)
        crashed = procs.crashed()
        if crashed:  # not our SIGKILLs: a node died by itself, worth a look at its log
            notes.append(f"nodes {crashed} exited on their own; see logs/")
        stop_watch.set()
        with contextlib.suppress(Exception):
            await watch_task
        for store in stores:
            with contextlib.suppress(Exception):
                await store.close()
        recorder.close()

    check_started = time.monotonic()
    workload.observe_run(election_s=config.tick_ms * config.election_ticks / 1000,
                         leader_changes=[entry["time"] for entry in watch.timeline])
    verdict = workload.check(recorder.events)
    timings["check"] = time.monotonic() - check_started
    timings["total"] = time.monotonic() - started
    summary = summarize(config, mode, recorder, watch, verdict, timings, notes)
    if mode == "netns":  # so a test can tell this run's leftovers from another run's namespaces
        summary["namespaces"] = [network.control_namespace, *map(network.namespace, procs.nodes)]
    write_results(run_dir, verdict, summary)
    from kvstore.jepsen.report import write_report

    write_report(run_dir)
    return RunResult(run_dir, verdict, summary)


async def _wait_for(condition: Any, timeout: float, what: str, procs: NodeProcesses) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        crashed = procs.crashed()
        if crashed:
            raise RuntimeError(f"nodes {crashed} exited on their own while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting {timeout:.0f}s for {what}")
        await asyncio.sleep(0.05)


#: The user the workload runs as with --auth: not root, a role with readwrite on every key.
JEPSEN_USER = ("jepsen", "jepsen-pw")


async def enable_auth(endpoints: list[str], tls: Any) -> None:
    """root, the JEPSEN_USER and its role, then auth enable; a step done by an earlier try is skipped."""
    from kvstore.client import AsyncClient
    from kvstore.client.errors import FailedPrecondition

    async with AsyncClient(endpoints, timeout=5.0, coalesce=False, tls=tls) as c:
        if (await c.auth_status())[0]:
            return
        steps = (lambda: c.user_add("root", "jepsen-root-pw"), lambda: c.role_add("jepsen"),
                 lambda: c.role_grant_permission("jepsen", "readwrite", b"\0", b"\0"),  # every key
                 lambda: c.user_add(*JEPSEN_USER), lambda: c.user_grant_role(JEPSEN_USER[0], "jepsen"))
        for step in steps:
            try:
                await step()
            except FailedPrecondition as e:  # "already exists": this step took effect on an earlier try
                if "already exists" not in str(e):
                    raise
        await c.auth_enable()


async def _retry(action: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await action()
        except Exception as error:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} kept failing: {error!r}") from error
            await asyncio.sleep(0.2)


async def _invoke(workload: Workload, store: Store, recorder: Recorder, process: int, op: Op,
                  timeout: float) -> str:
    """One recorded call: invoke, run, classify, complete. Returns the outcome."""
    mutation = op.f in workload.mutations
    recorder.invoke(process, op.f, op.key, op.value)
    try:
        outcome, value = await asyncio.wait_for(workload.apply(store, op), timeout)
    except Exception as error:  # includes asyncio.TimeoutError: unknown for a mutation
        outcome = store.outcome_of(error, mutation)
        if outcome == FAIL and op.f in workload.answered_fails:
            # "Not applied" (e.g. every attempt met "no leader" during an election)
            # is no failed compare: as a cas ``fail`` it would claim the register
            # did not hold the expected value. Unknown is what we know.
            outcome = INFO
        value = op.value if mutation else None
    recorder.complete(process, outcome, value)
    return outcome


async def _worker(slot: int, concurrency: int, workload: Workload, store: Store,
                  recorder: Recorder, deadline: float, interval: float, rng: random.Random,
                  hard_timeout: float) -> None:
    """A logical client: one call at a time. After an ``info`` the call may still be
    in flight, so the client continues under a new process number (Jepsen's rule).

    ``hard_timeout`` bounds one whole operation (a set add may take several round
    trips); the client's own per-call deadline usually fires first.
    """
    process = slot
    while time.monotonic() < deadline:
        began = time.monotonic()
        outcome = await _invoke(workload, store, recorder, process, workload.next_op(), hard_timeout)
        if outcome == INFO:
            process += concurrency
        if interval:
            # Poisson-ish pacing: spread calls so the rate cap holds on average.
            pause = rng.uniform(0, 2 * interval) - (time.monotonic() - began)
            if pause > 0:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))


async def _final_reads(workload: Workload, store: Store, recorder: Recorder, process: int,
                       timeout: float = 20.0, attempts: int = 10) -> None:
    """Each final read is retried (each attempt recorded) until it succeeds."""
    for op in workload.final_ops():
        for _ in range(attempts):
            if await _invoke(workload, store, recorder, process, op, timeout) == OK:
                break
            await asyncio.sleep(0.5)


# -------------------------------------------------------------- the results

def summarize(config: RunConfig, mode: str, recorder: Recorder, watch: LeaderWatch,
              verdict: Verdict, timings: dict[str, float], notes: list[str]) -> dict[str, Any]:
    outcomes = recorder.outcome_counts()
    by_f: dict[str, Counter[str]] = {}
    for event in recorder.events:
        if event.type != INVOKE:
            by_f.setdefault(event.f, Counter())[event.type] += 1
    faults = [asdict(f) for f in recorder.faults]
    t0 = recorder.start_time
    for fault in faults:
        fault["start_s"] = round((fault["start"] - t0) / 1e9, 3)
        fault["end_s"] = None if fault["end"] is None else round((fault["end"] - t0) / 1e9, 3)
    return {
        "workload": config.workload, "nemesis": config.nemesis, "nodes": config.nodes,
        "time": config.time, "network": mode, "seed": config.seed,
        "election_s": config.tick_ms * config.election_ticks / 1000,
        "server_args": config.server_args, "tls": config.tls, "auth": config.auth,
        "valid": verdict.valid, "verdict": verdict.summary,
        "ops": {"total": sum(outcomes.values()), **outcomes},
        "ops_by_function": {f: dict(c) for f, c in sorted(by_f.items())},
        "faults_injected": len(faults),
        "faults_by_kind": dict(Counter(f["kind"] for f in faults)),
        "faults": faults,
        "leader_changes": watch.changes,
        "leaders": [{**entry, "time_s": round((entry["time"] - t0) / 1e9, 3)} for entry in watch.timeline],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "notes": notes,
        "start_time": t0,
    }


def write_results(run_dir: Path, verdict: Verdict, summary: dict[str, Any]) -> None:
    (run_dir / "verdict.json").write_text(json.dumps(
        {"valid": verdict.valid, "unknown": verdict.unknown, "summary": verdict.summary, **verdict.details},
        indent=2, default=str))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


__all__ = ["RunConfig", "RunResult", "run", "outcome_of", "VALID", "INVALID", "UNKNOWN"]
