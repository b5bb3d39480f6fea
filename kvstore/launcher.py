"""A cluster of REAL node processes on one machine.

Used by `kvstore cluster up`, the integration tests, the Jepsen harness and
the benchmarks, so that all of them exercise the same thing a user runs:
separate `python -m kvstore.server.main` processes talking gRPC. Faults are
real signals: kill (SIGKILL), pause/resume (SIGSTOP/SIGCONT), stop (SIGTERM).

Addresses: by default the local-cluster convention (member i serves clients on
127.0.0.1:2379+100*(i-1) and peers on 2380+100*(i-1)); tests use
`LocalCluster.with_free_ports(...)` so parallel runs never collide. For network
namespaces, pass `netns={i: "ns-name"}` (the command is prefixed with
`ip netns exec NS`) and explicit `client_addrs`/`peer_addrs` with each member's
IP; `listen_hosts` makes a member bind one IP (or 0.0.0.0) while advertising
another. `certs` (a `kvstore certs init` directory) runs every member with
client and peer TLS, https:// URLs and --client-cert-auth.

Nodes die with the process that launched them (PR_SET_PDEATHSIG), so a
launcher killed without its cleanup (SIGKILL, a lost terminal) leaves no
orphans holding the ports and data dirs.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc

from kvstore.server.parent_death import DIE_WITH_PARENT_ENV
from kvstore.storage.data_dir_lock import data_dir_holder
from kvstore.v1 import cluster_pb2, cluster_pb2_grpc

from kvstore.server.config import DEFAULT_BASE_CLIENT_PORT, DEFAULT_BASE_PEER_PORT, PORT_STRIDE, format_members

if TYPE_CHECKING:
    from kvstore.certs import CertDir
    from kvstore.client.tls import TLS

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports the kernel just handed out (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NodeFailedToStart(RuntimeError):
    pass


# Test-only switch: start nodes without the death signal (shows the tests catch orphans).
TESTING_NO_PDEATHSIG = os.environ.get("KVSTORE_TESTING_NO_PDEATHSIG") == "1"


_spawn_thread: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    """The one long-lived thread every node is forked from.

    A node asks for SIGKILL when its parent goes (PR_SET_PDEATHSIG, see
    kvstore/server/parent_death.py), and Linux ties that signal to the thread
    that forked the child, not the process: so every node is forked from this
    one thread, which lives as long as the process. No preexec_fn: running
    Python between fork and exec in a threaded process (gRPC's threads) can
    crash the child.
    """
    global _spawn_thread
    if _spawn_thread is None:
        _spawn_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="launcher-spawn")
    return _spawn_thread


class LocalCluster:
    def __init__(
        self,
        base_dir: str,
        nodes: int = 3,
        base_client_port: int = DEFAULT_BASE_CLIENT_PORT,
        base_peer_port: int = DEFAULT_BASE_PEER_PORT,
        extra_args: list[str] | tuple[str, ...] = (),
        *,
        host: str = "127.0.0.1",
        client_addrs: dict[int, str] | None = None,
        peer_addrs: dict[int, str] | None = None,
        listen_hosts: dict[int, str] | None = None,
        netns: dict[int, str] | None = None,
        node_args: dict[int, list[str]] | None = None,
        prefix: dict[int, list[str]] | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        node_env: dict[int, dict[str, str]] | None = None,
        certs: CertDir | None = None,
        metrics_addrs: dict[int, str] | None = None,
    ) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.ids = list(range(1, nodes + 1))
        self.client_addrs = client_addrs or {
            i: f"{host}:{base_client_port + PORT_STRIDE * (i - 1)}" for i in self.ids
        }
        self.peer_addrs = peer_addrs or {i: f"{host}:{base_peer_port + PORT_STRIDE * (i - 1)}" for i in self.ids}
        self.listen_hosts = listen_hosts or {}
        self.metrics_addrs = metrics_addrs or {}  # member -> --listen-metrics-addr (none: no HTTP endpoints)
        self.netns = netns or {}
        self.extra_args = list(extra_args)
        self.node_args = node_args or {}
        # member -> a command its node runs under, read at each start (the fail-stop tests run a
        # member under `strace -e inject=...` to fail its fsyncs)
        self.prefix = prefix or {}
        self.python = python
        self.env = env
        self.node_env = node_env or {}  # per member, over `env` (e.g. its boot id, its clock shim)
        self.certs = certs
        self.procs: dict[int, subprocess.Popen] = {}
        self._paused: set[int] = set()
        self._channels: dict[int, grpc.Channel] = {}

    @classmethod
    def with_free_ports(cls, base_dir: str, nodes: int = 3, extra_args=(), host: str = "127.0.0.1", **kw):
        """A cluster on ports nobody else is using (for tests and benchmarks)."""
        ports = free_ports(3 * nodes, host)
        ids = range(1, nodes + 1)
        kw.setdefault("metrics_addrs", {i: f"{host}:{ports[3 * (i - 1) + 2]}" for i in ids})
        return cls(
            base_dir, nodes, extra_args=extra_args, host=host,
            client_addrs={i: f"{host}:{ports[3 * (i - 1)]}" for i in ids},
            peer_addrs={i: f"{host}:{ports[3 * (i - 1) + 1]}" for i in ids},
            **kw,
        )

    # ------------------------------------------------------------------ addresses

    @property
    def endpoints(self) -> list[str]:
        return [self.client_addrs[i] for i in self.ids]

    def client_addr(self, i: int) -> str:
        return self.client_addrs[i]

    def metrics_url(self, i: int, path: str = "/metrics") -> str:
        return f"http://{self.metrics_addrs[i]}{path}"

    def peer_addr(self, i: int) -> str:
        return self.peer_addrs[i]

    def client_tls(self) -> TLS | None:
        """The TLS settings a client of this cluster needs (None without `certs`)."""
        from kvstore.client.tls import TLS

        c = self.certs
        return None if c is None else TLS(ca=c.ca_cert, cert=c.client_cert, key=c.client_key)

    def data_dir(self, i: int) -> str:
        return os.path.join(self.base_dir, f"node{i}")

    def log_path(self, i: int) -> str:
        return os.path.join(self.base_dir, f"node{i}.log")

    def command(self, i: int) -> list[str]:
        def listen(addr: str) -> str:
            host = self.listen_hosts.get(i)
            return addr if host is None else f"{host}:{addr.rsplit(':', 1)[1]}"

        def urls(addrs: dict[int, str]) -> dict[int, str]:
            return addrs if self.certs is None else {j: f"https://{a}" for j, a in addrs.items()}

        cmd = [
            self.python, "-m", "kvstore.server.main",
            "--id", str(i),
            "--data-dir", self.data_dir(i),
            "--initial-cluster", format_members(urls(self.peer_addrs)),
            "--initial-cluster-clients", format_members(urls(self.client_addrs)),
            "--listen-client-addr", listen(self.client_addrs[i]),
            "--listen-peer-addr", listen(self.peer_addrs[i]),
            *(self.certs.node_flags(i) if self.certs is not None else []),
            *(["--listen-metrics-addr", listen(self.metrics_addrs[i])] if i in self.metrics_addrs else []),
            *self.extra_args,
            *self.node_args.get(i, []),
        ]
        cmd = [*self.prefix.get(i, []), *cmd]
        if i in self.netns:
            cmd = ["ip", "netns", "exec", self.netns[i], *cmd]
        return cmd

    # ------------------------------------------------------------------ processes

    def start(self) -> LocalCluster:
        for i in self.ids:
            if not self.is_running(i):
                self.start_node(i)
        return self

    def start_node(self, i: int) -> None:
        os.makedirs(self.base_dir, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.update(self.node_env.get(i, {}))
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        logf = open(self.log_path(i), "ab")
        try:
            if not TESTING_NO_PDEATHSIG and i not in self.prefix:  # under a prefix, the parent is that command
                env[DIE_WITH_PARENT_ENV] = str(os.getpid())
            self.procs[i] = _spawner().submit(
                subprocess.Popen,
                self.command(i), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # Ctrl-C in a terminal reaches us, not the nodes
            ).result()
        finally:
            logf.close()
        self._paused.discard(i)

    def is_running(self, i: int) -> bool:
        p = self.procs.get(i)
        return p is not None and p.poll() is None

    def pid(self, i: int) -> int | None:
        p = self.procs.get(i)
        return p.pid if p is not None else None

    def data_dirs_in_use(self) -> dict[int, int]:
        """Members whose data dir another live process holds: member -> its pid (0: not yet known)."""
        held = {i: data_dir_holder(self.data_dir(i)) for i in self.ids}
        return {i: pid for i, pid in held.items() if pid is not None}

    def running(self) -> list[int]:
        return [i for i in self.ids if self.is_running(i)]

    def _signal(self, i: int, sig: int) -> None:
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def kill(self, i: int) -> None:
        """SIGKILL: the crash nothing can clean up after."""
        self._signal(i, signal.SIGKILL)
        p = self.procs.get(i)
        if p is not None:
            p.wait()
        self._paused.discard(i)

    def pause(self, i: int) -> None:
        self._signal(i, signal.SIGSTOP)
        self._paused.add(i)

    def resume(self, i: int) -> None:
        self._signal(i, signal.SIGCONT)
        self._paused.discard(i)

    def stop_node(self, i: int, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code."""
        p = self.procs.get(i)
        if p is None:
            return None
        if i in self._paused:
            self.resume(i)
        self._signal(i, signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def restart(self, i: int, graceful: bool = True) -> None:
        if graceful:
            self.stop_node(i)
        else:
            self.kill(i)
        self.start_node(i)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every node at once, then wait for each."""
        for i in list(self._paused):
            self.resume(i)
        for i in self.ids:
            self._signal(i, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ observation

    def _stub(self, i: int) -> cluster_pb2_grpc.ClusterStub:
        ch = self._channels.get(i)
        if ch is None:
            addr = self.client_addrs[i]
            tls = self.client_tls()
            ch = grpc.insecure_channel(addr) if tls is None else grpc.secure_channel(addr, tls.credentials())
            self._channels[i] = ch
        return cluster_pb2_grpc.ClusterStub(ch)

    def status(self, i: int, timeout: float = 1.0) -> cluster_pb2.StatusResponse | None:
        """Member i's own view, or None if it does not answer."""
        if not self.is_running(i) or i in self._paused:
            return None
        try:
            return self._stub(i).Status(cluster_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return None

    def statuses(self, timeout: float = 1.0) -> dict[int, cluster_pb2.StatusResponse | None]:
        return {i: self.status(i, timeout) for i in self.ids}

    def leader(self) -> int | None:
        """The member that says it leads in the highest term any member reports, if any."""
        sts = [s for s in self.statuses(0.5).values() if s is not None]
        if not sts:
            return None
        top = max(s.term for s in sts)
        for s in sts:
            if s.role == "leader" and s.term == top:
                return s.member_id
        return None

    def wait_for_leader(self, timeout: float = 30.0, exclude: int | None = None) -> int:
        """Poll until a leader is known (not `exclude`); raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            lead = self.leader()
            if lead is not None and lead != exclude:
                return lead
            time.sleep(0.05)
        raise TimeoutError(f"no leader within {timeout}s; logs in {self.base_dir}")

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
        """Poll predicate() until it returns a truthy value; return that value."""
        deadline = time.monotonic() + timeout
        while True:
            v = predicate()
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout}s; logs in {self.base_dir}")
            time.sleep(interval)

    def check_alive(self) -> None:
        """Raise NodeFailedToStart (with its log's tail) if a node we started has exited on its own."""
        for i, p in self.procs.items():
            if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                raise NodeFailedToStart(f"member {i} exited with code {p.returncode}:\n{self.log_tail(i)}")

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:
            with open(self.log_path(i), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"
