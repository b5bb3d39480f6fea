"""/metrics, /health, /livez and /readyz of real nodes, through a partition and its heal."""
from __future__ import annotations

import json

import pytest

from kvstore.client import Client
from tests.integration.metrics_cluster import http_get, metric, proxied_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with proxied_cluster(str(tmp_path_factory.mktemp("http"))) as (lc, net):
        yield lc, net


def test_metrics_show_the_leader_the_writes_and_the_disk(cluster):
    lc, _net = cluster
    leader = lc.wait_for_leader(30)
    with Client(lc.endpoints) as c:
        for i in range(20):
            c.put(f"m{i}", "v")
    status, text = http_get(lc.metrics_url(leader))
    assert status == 200
    assert metric(text, "kvstore_server_has_leader") == 1
    assert metric(text, "kvstore_server_is_leader") == 1
    assert metric(text, "kvstore_server_leader_changes_seen_total") >= 1
    assert metric(text, "kvstore_mvcc_keys_total") == 20
    assert metric(text, "kvstore_mvcc_current_revision") == 20
    assert metric(text, "kvstore_server_proposals_committed_total") >= 21  # 20 puts and the leader's no-op
    assert metric(text, "kvstore_disk_wal_fsync_duration_seconds_count") >= 1
    assert metric(text, "kvstore_disk_backend_commit_duration_seconds_count") >= 1
    # The client sends them over its session stream: each counts as the Put it stands for.
    assert metric(text, "kvstore_grpc_server_handled_total",
                  '{grpc_code="OK",grpc_method="Put",grpc_service="kvstore.v1.KV",grpc_type="session"}') == 20
    assert metric(text, "process_resident_memory_bytes") > 0
    followers = [i for i in lc.ids if i != leader]

    def rtt_seen():
        _s, t = http_get(lc.metrics_url(leader))
        return all((metric(t, "kvstore_network_peer_round_trip_time_seconds_count", f'{{To="{f}"}}') or 0) > 0
                   for f in followers)

    lc.wait_for(rtt_seen, 30, "heartbeat round trips to every follower")
    _s, ftext = http_get(lc.metrics_url(followers[0]))
    assert metric(ftext, "kvstore_server_is_leader") == 0 and metric(ftext, "kvstore_server_has_leader") == 1
    assert metric(ftext, "kvstore_network_peer_received_bytes_total", f'{{From="{leader}"}}') > 0


def test_health_livez_readyz_and_unknown_paths(cluster):
    lc, _net = cluster
    lc.wait_for_leader(30)
    for i in lc.ids:
        status, body = http_get(lc.metrics_url(i, "/health"))
        assert (status, json.loads(body)) == (200, {"health": "true", "reason": ""})
        assert http_get(lc.metrics_url(i, "/livez")) == (200, "ok\n")
        assert http_get(lc.metrics_url(i, "/readyz")) == (200, "ok\n")
    assert http_get(lc.metrics_url(1, "/nope"))[0] == 404


def test_a_member_cut_off_from_the_others_is_unhealthy_until_the_heal(cluster):
    lc, net = cluster
    leader = lc.wait_for_leader(30)
    cut = next(i for i in lc.ids if i != leader)
    others = [i for i in lc.ids if i != cut]
    net.partition({cut: others})
    try:
        def unhealthy():
            status, body = http_get(lc.metrics_url(cut, "/health"))
            return (status, json.loads(body)) if status == 503 else None

        status, body = lc.wait_for(unhealthy, 30, f"/health of member {cut} turning 503")
        assert body == {"health": "false", "reason": "RAFT NO LEADER"}
        assert http_get(lc.metrics_url(cut, "/readyz")) == (503, "[-]RAFT NO LEADER\n")
        assert http_get(lc.metrics_url(cut, "/livez")) == (200, "ok\n")  # alive, just not useful
        _s, text = http_get(lc.metrics_url(cut))
        assert metric(text, "kvstore_server_has_leader") == 0
        assert http_get(lc.metrics_url(lc.wait_for_leader(30, exclude=cut), "/health"))[0] == 200
    finally:
        net.heal()
    lc.wait_for(lambda: http_get(lc.metrics_url(cut, "/health"))[0] == 200, 30,
                f"/health of member {cut} back to 200 after the heal")
