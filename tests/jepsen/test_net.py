"""The namespace network: partitions really block TCP, healing restores it, cleanup is total."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvstore.jepsen import net

pytestmark = pytest.mark.skipif(net.netns_supported() is not None,
                                reason=f"namespace network unavailable: {net.netns_supported()}")

PORT = 7700


class Echo:
    """A TCP echo server living in one namespace (a thread that entered it)."""

    def __init__(self, namespace: str, ip: str) -> None:
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(namespace, ip), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), f"echo server in {namespace} did not start"

    def _serve(self, namespace: str, ip: str) -> None:
        with net.in_namespace(namespace):
            server = socket.create_server((ip, PORT))
        server.settimeout(0.1)
        self.ready.set()
        with server:
            while not self.stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(1024):
                    conn.sendall(data)
            except OSError:
                pass


def connects(namespace: str, ip: str, timeout: float = 1.0) -> bool:
    """Can a fresh TCP connection from ``namespace`` reach the echo server at ``ip`` and echo?"""
    def attempt() -> bool:
        with net.in_namespace(namespace):
            sock = socket.socket()
        sock.settimeout(timeout)
        try:
            sock.connect((ip, PORT))
            sock.sendall(b"ping")
            return sock.recv(4) == b"ping"
        except OSError:
            return False
        finally:
            sock.close()
    with ThreadPoolExecutor(1) as pool:  # a fresh thread: setns never leaks into the caller
        return pool.submit(attempt).result()


def reachability(network: net.NamespaceNetwork) -> dict[tuple[str, int], bool]:
    """Every (source, destination node) pair, sources being nodes and the control namespace."""
    sources = {f"n{i}": network.namespace(i) for i in range(1, network.nodes + 1)}
    sources["ctl"] = network.control_namespace
    pairs = [(src, dst) for src in sources for dst in range(1, network.nodes + 1)
             if src != f"n{dst}"]
    with ThreadPoolExecutor(len(pairs)) as pool:
        results = pool.map(lambda p: connects(sources[p[0]], network.ip(p[1])), pairs)
        return dict(zip(pairs, results))


def leftovers(tag: str) -> list[str]:
    found = [f"netns {n}" for n in net.list_namespaces(f"{net.PREFIX}{tag}")]
    found += [f"link {n}" for n in net.list_root_links()]
    return found


def test_partition_blocks_tcp_and_heal_restores() -> None:
    network = net.NamespaceNetwork(3)
    try:
        network.create()
        servers = [Echo(network.namespace(i), network.ip(i)) for i in (1, 2, 3)]
        assert all(reachability(network).values()), "a fresh network must be fully connected"

        # A long-lived connection opened before the partition, as Raft peers have.
        with net.in_namespace(network.namespace(2)):
            held = socket.socket()
        held.settimeout(5)
        held.connect((network.ip(1), PORT))

        network.partition({1: {2, 3}, 2: {1}, 3: {1}})  # isolate node 1
        assert len(network.rules(1)) == 2 and len(network.rules(2)) == 1
        seen = reachability(network)
        blocked = {k for k, v in seen.items() if not v}
        assert blocked == {("n1", 2), ("n1", 3), ("n2", 1), ("n3", 1)}, seen
        # Established connections stall too: bytes are neither delivered nor refused.
        held.settimeout(1)
        held.sendall(b"x")
        with pytest.raises(TimeoutError):
            held.recv(1)

        # A one-sided grudge still cuts TCP both ways (the handshake needs both).
        network.partition({3: {2}})
        blocked = {k for k, v in reachability(network).items() if not v}
        assert blocked == {("n2", 3), ("n3", 2)}

        network.heal()
        assert network.rules(1) == network.rules(2) == network.rules(3) == []
        assert all(reachability(network).values()), "heal must restore every link"
        # The stalled connection resumes: TCP retransmits what was dropped.
        held.settimeout(10)
        assert held.recv(1) == b"x"
        held.close()
        for server in servers:
            server.stop.set()
    finally:
        network.teardown()
    assert leftovers(network.tag) == []


def test_teardown_on_failure_and_cleanup_removes_everything() -> None:
    with pytest.raises(RuntimeError):
        with net.NamespaceNetwork(2) as network:
            assert len(net.list_namespaces(f"{net.PREFIX}{network.tag}")) == 3
            raise RuntimeError("the run failed")
    assert leftovers(network.tag) == []

    # A run that died without tearing down: `kvstore jepsen cleanup` finds it by prefix.
    abandoned = net.NamespaceNetwork(2).create()
    abandoned.partition({1: {2}})
    # (scoped to its tag: a bare cleanup() would also end runs happening in parallel)
    removed = net.cleanup(f"{net.PREFIX}{abandoned.tag}-")
    assert f"netns {abandoned.namespace(1)}" in removed
    assert leftovers(abandoned.tag) == []
    assert net.list_root_rules() == []


def test_addresses_stay_inside_harness_namespaces() -> None:
    with net.NamespaceNetwork(3) as network:
        root_addrs = net._run(["ip", "-o", "addr", "show"]).stdout
        assert "10.77.0." not in root_addrs
        assert network.ip(1) == "10.77.0.11" and network.control_ip == "10.77.0.1"
        with pytest.raises(ValueError):
            network.partition({1: {1}})


def test_cleanup_command_removes_an_abandoned_network() -> None:
    from click.testing import CliRunner

    from kvstore.jepsen.cli import jepsen

    abandoned = net.NamespaceNetwork(2).create()
    abandoned.partition({1: {2}})
    result = CliRunner().invoke(jepsen, ["cleanup"])
    assert result.exit_code == 0 and f"netns {abandoned.namespace(1)}" in result.output
    assert leftovers(abandoned.tag) == []
    assert "nothing left behind" in CliRunner().invoke(jepsen, ["cleanup"]).output
