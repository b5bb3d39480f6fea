"""A member whose state silently diverged is named by `kvstore check hash`, alarmed, and refuses reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import grpc
import pytest

from kvstore.client import Client
from kvstore.launcher import LocalCluster
from kvstore.v1 import kv_pb2
from tests.integration.metrics_cluster import http_get, metric
from tests.integration.server_cluster import kv_stub


def kvstore_cli(lc: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", "--endpoints", ",".join(lc.endpoints),
                           "--timeout", "20", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def write_some(lc: LocalCluster, n: int = 30) -> None:
    with Client(lc.endpoints) as c:
        for i in range(n):
            c.put(f"key{i}", f"value{i}")


def test_check_hash_agrees_on_a_healthy_cluster_under_writes(tmp_path):
    """Members hash the same log index even while writes keep landing (no false alarm)."""
    with LocalCluster.with_free_ports(str(tmp_path)) as lc:
        lc.wait_for_leader(60)
        write_some(lc)
        stop = threading.Event()

        def writer():
            with Client(lc.endpoints) as c:
                i = 0
                while not stop.is_set():
                    c.put(f"busy{i % 50}", str(i))
                    i += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            for _ in range(2):
                r = kvstore_cli(lc, "check", "hash")
                assert r.returncode == 0, r.stdout + r.stderr
                assert "OK: all 3 members agree" in r.stdout
                hashes = {line.split("hash ")[1] for line in r.stdout.splitlines() if line.startswith("member ")}
                assert len(hashes) == 1
        finally:
            stop.set()
            t.join(30)
        assert kvstore_cli(lc, "alarm", "list").stdout == ""
        r = kvstore_cli(lc, "alarm", "disarm")  # nothing to clear: goes through the log all the same
        assert (r.returncode, r.stdout) == (0, ""), r.stderr


def test_a_corrupted_member_is_named_alarmed_and_refuses_reads(tmp_path):
    # Member 3 writes a key no log entry made when it starts; the leader checks every second.
    with LocalCluster.with_free_ports(str(tmp_path), extra_args=["--corrupt-check-time", "1s"],
                                      node_args={3: ["--testing-corrupt-state"]}) as lc:
        lc.wait_for_leader(60)
        write_some(lc)

        r = kvstore_cli(lc, "check", "hash")
        assert r.returncode == 1
        assert "CORRUPT: member 3 " in r.stderr, r.stderr

        def alarmed():
            _s, text = http_get(lc.metrics_url(1))
            return metric(text, "kvstore_server_alarms_active", '{alarm="CORRUPT"}') == 1

        lc.wait_for(alarmed, 60, "the leader's periodic check raising a CORRUPT alarm")
        # A corrupt member made leader hands leadership on at its next check.
        with Client(lc.endpoints) as c:
            c.transfer_leader(3)
        lc.wait_for(lambda: lc.leader() not in (None, 3), 60, "leadership leaving the corrupt member 3")
        status, body = http_get(lc.metrics_url(3, "/health"))
        assert (status, json.loads(body)["reason"]) == (503, "ALARM CORRUPT")

        r = kvstore_cli(lc, "status")
        assert "alarm: memberID:3 alarm:CORRUPT" in r.stderr, r.stderr + r.stdout
        assert kvstore_cli(lc, "alarm", "list").stdout.strip() == "memberID:3 alarm:CORRUPT"

        # Member 3 refuses reads, serializable ones included; the others serve them.
        with pytest.raises(grpc.RpcError) as e:
            kv_stub(lc.client_addr(3)).Range(kv_pb2.RangeRequest(key=b"key1", serializable=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert "CORRUPT" in e.value.details()
        batch = kv_pb2.BatchRequest(ops=[kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=b"key1",
                                                                                            serializable=True))])
        with pytest.raises(grpc.RpcError) as e:
            kv_stub(lc.client_addr(3)).Batch(batch, timeout=10)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        r1 = kv_stub(lc.client_addr(2)).Range(kv_pb2.RangeRequest(key=b"key1", serializable=True), timeout=10)
        assert r1.kvs[0].value == b"value1"

        # The alarm is replicated state: it survives member 3's restart.
        lc.restart(3)
        lc.wait_for(lambda: http_get(lc.metrics_url(3, "/health"))[0] == 503, 60, "member 3 back, still alarmed")
        with pytest.raises(grpc.RpcError) as e:
            kv_stub(lc.client_addr(3)).Range(kv_pb2.RangeRequest(key=b"key1", serializable=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS


def test_the_periodic_check_runs_over_client_tls(tmp_path):
    """With TLS on the client API (client certificates required), the leader still reaches every member."""
    from kvstore.certs import init

    certs = init(str(tmp_path / "tls"), 3)
    with LocalCluster.with_free_ports(str(tmp_path / "cluster"), certs=certs,
                                      extra_args=["--corrupt-check-time", "1s"],
                                      node_args={3: ["--testing-corrupt-state"]}) as lc:
        lc.wait_for_leader(60)

        def alarmed():
            _s, text = http_get(lc.metrics_url(1))
            return metric(text, "kvstore_server_alarms_active", '{alarm="CORRUPT"}') == 1

        lc.wait_for(alarmed, 60, "a CORRUPT alarm raised by a check over TLS")
