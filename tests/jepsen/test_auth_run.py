"""A Jepsen register run under partitions and kills on a TLS cluster with auth enabled.

The workload runs as a non-root user whose role grants readwrite on every key:
every request carries a token, every op is checked, and tokens must keep
working across members killed, restarted and cut off (any member accepts any
member's token, see kvstore/server/tokens.py).
"""
from __future__ import annotations

import pytest

from tests.jepsen.test_harness_cluster import FAST, assert_complete_run_dir, jepsen_run


@pytest.mark.slow
def test_register_under_partition_and_kill_on_a_tls_auth_cluster_is_valid(tmp_path):
    code, summary, run_dir = jepsen_run(tmp_path, "tls-auth", "--tls", "--auth", "--time", "20",
                                        "--workload", "register", "--nemesis", "partition,kill", *FAST)
    assert code == 0, summary
    assert_complete_run_dir(run_dir, summary)
    assert summary["auth"] and summary["tls"]
    assert summary["ops"]["ok"] > 100 and summary["faults_injected"] > 0, summary
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("node*.log"))
    assert "auth change enable by a client (auth disabled)" in logs
