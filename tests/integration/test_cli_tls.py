"""`kvstore cluster up --tls`: one flag runs a TLS cluster and prints how to point the CLI at it.

The test follows the printed instructions literally: it takes the `export`
lines from the launcher's output, runs `kvstore put` and `get` with that
environment, and checks that without them the CLI is refused with one line.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from kvstore.server.config import PORT_STRIDE
from kvstore.launcher import free_ports

DEADLINE_S = 90.0


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def base_ports(nodes: int) -> tuple[int, int]:
    """A client and a peer base port whose strided members' ports are all free."""
    while True:
        base = free_ports(1)[0]
        if base + 1 + PORT_STRIDE * nodes < 65536 and all(
                bindable(base + off + PORT_STRIDE * i) for i in range(nodes) for off in (0, 1)):
            return base, base + 1


def kvstore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_cluster_up_tls_prints_exports_that_work(tmp_path):
    client_base, peer_base = base_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    up = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "cluster", "up", "--tls", "--dir", str(tmp_path / "data"),
                           "--base-client-port", str(client_base), "--base-peer-port", str(peer_base)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        exports: dict[str, str] = {}
        lines = []
        deadline = time.monotonic() + DEADLINE_S
        while "KVSTORE_KEY" not in exports:
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines)
            line = up.stdout.readline()
            lines.append(line)
            if line.strip().startswith("export "):
                for assignment in shlex.split(line.strip())[1:]:
                    name, _, value = assignment.partition("=")
                    exports[name] = value
        assert exports["KVSTORE_ENDPOINTS"].startswith("https://")
        tls_env = {**env, **exports}
        put = kvstore("put", "greeting", "hello", env=tls_env)
        assert put.returncode == 0 and "OK" in put.stdout, put.stdout + put.stderr
        get = kvstore("get", "greeting", env=tls_env)
        assert get.stdout.strip() == "hello", get.stdout + get.stderr
        plain_env = {**env, "KVSTORE_ENDPOINTS": exports["KVSTORE_ENDPOINTS"].replace("https://", "")}
        refused = kvstore("--timeout", "1", "get", "greeting", env=plain_env)
        assert refused.returncode == 1
        err = refused.stderr.strip().splitlines()
        assert len(err) == 1 and "may serve TLS" in err[0], refused.stderr
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
