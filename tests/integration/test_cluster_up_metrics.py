"""`kvstore cluster up` serves each member's /metrics and /health, and prints where."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

from tests.integration.metrics_cluster import http_get, metric


def free_base_port() -> int:
    """A client port B such that B, B+1, B+2 (client, peer, metrics) and the same +100, +200 are free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 202 >= 65536:
            continue
        try:
            socks = []
            for off in (0, 1, 2, 100, 101, 102, 200, 201, 202):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + off))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def test_cluster_up_prints_and_serves_the_metrics_endpoints(tmp_path):
    base = free_base_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore.cli", "cluster", "up", "--dir", str(tmp_path / "data"),
         "--base-client-port", str(base), "--base-peer-port", str(base + 1)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 90
        urls = None
        lines = []
        while urls is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("metrics: "):
                urls = re.findall(r"http://\S+/metrics", line)
        assert urls == [f"http://127.0.0.1:{base + 2 + 100 * i}/metrics" for i in range(3)], "".join(lines)

        def agreed():  # followers learn the new leader from its first message
            texts = [http_get(u)[1] for u in urls]
            return all(metric(t, "kvstore_server_has_leader") == 1 for t in texts) and texts

        end = time.monotonic() + 30
        while not (texts := agreed()) and time.monotonic() < end:
            time.sleep(0.1)
        assert texts, "kvstore_server_has_leader is not 1 on every member"
        assert sum(metric(t, "kvstore_server_is_leader") for t in texts) == 1
        assert http_get(urls[0].replace("/metrics", "/health"))[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
