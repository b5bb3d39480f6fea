"""A Jepsen register run under partitions and kills on a TLS cluster (client certificates, mutual peer TLS).

Members are killed and restarted and the network is cut while every client
and peer connection is TLS: reconnects, handshakes with restarted members,
and certificates naming each member's address all have to hold for the
history to be linearizable with writes getting through.
"""
from __future__ import annotations

import pytest

from tests.jepsen.test_harness_cluster import FAST, assert_complete_run_dir, jepsen_run


@pytest.mark.slow
def test_register_under_partition_and_kill_on_a_tls_cluster_is_valid(tmp_path):
    code, summary, run_dir = jepsen_run(tmp_path, "tls", "--tls", "--time", "20", "--workload", "register",
                                        "--nemesis", "partition,kill", *FAST)
    assert code == 0, summary
    assert_complete_run_dir(run_dir, summary)
    assert summary["ops"]["ok"] > 100 and summary["faults_injected"] > 0, summary
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("node*.log"))
    assert "serving clients on https://" in logs and "peers on https://" in logs
