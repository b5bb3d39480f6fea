"""`kvstore cluster add` grows a running local cluster by one member: learner first, then promoted."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket

from click.testing import CliRunner

from kvstore.cli import main
from kvstore.client import Client
from kvstore.launcher import LocalCluster


def _free_base() -> int:
    """A base port whose conventional ports for 4 members (client, peer, metrics) are all free now."""
    for _ in range(50):
        base = random.randrange(20000, 40000, 10)
        ports = [base + d + 100 * k for k in range(4) for d in (0, 1, 2)]
        try:
            socks = []
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no free port range")


def test_cluster_add_starts_a_learner_and_promotes_it(tmp_path):
    base = _free_base()
    lc = LocalCluster(str(tmp_path), 3, base_client_port=base, base_peer_port=base + 1,
                      metrics_addrs={i: f"127.0.0.1:{base + 2 + 100 * (i - 1)}" for i in (1, 2, 3)})
    lc.start()
    pid = None
    try:
        lc.wait_for_leader(60)
        eps = ",".join(lc.endpoints)
        r = CliRunner().invoke(main, ["--endpoints", eps, "--timeout", "20", "cluster", "add", "--dir", str(tmp_path),
                                      "--base-client-port", str(base), "--base-peer-port", str(base + 1)])
        assert r.exit_code == 0, r.output
        assert "member 4 added as a learner" in r.output and "member 4 promoted to voter" in r.output
        pid = int(re.search(r"pid (\d+)", r.output).group(1))
        r = CliRunner().invoke(main, ["--endpoints", eps, "member", "list", "-w", "json"])
        doc = json.loads(r.output)
        assert sorted(m["ID"] for m in doc["members"]) == [1, 2, 3, 4]
        assert not any(m.get("isLearner") for m in doc["members"])
        with Client(lc.endpoints, timeout=20) as c:
            c.put(b"grown", b"yes")
        with Client([f"127.0.0.1:{base + 300}"], timeout=20) as c:
            lc.wait_for(lambda: c.get(b"grown", serializable=True).value == b"yes" or None, 30, "member 4 applying")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)  # spawned by this process (the CLI ran in it)
        lc.stop()
