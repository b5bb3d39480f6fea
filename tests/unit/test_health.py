"""The health rules (health.py) and the HTTP answers built from them (http_endpoints.py)."""
from __future__ import annotations

import json
import time
import types

from kvstore.server import health
from kvstore.server.http_endpoints import HttpEndpoints
from kvstore.server.metrics import FastHistogram


def node(**kw):
    base = dict(draining=False, leader_id=2, sm=types.SimpleNamespace(alarms=frozenset()), wal_append_since=0.0)
    return types.SimpleNamespace(**{**base, **kw})


def answer(n, path: str):
    ep = HttpEndpoints.__new__(HttpEndpoints)  # route() needs only the node (no registry for these paths)
    ep.node = n
    return ep.route(path)


def test_a_member_with_a_leader_and_no_alarm_is_healthy():
    assert health.problems(node()) == []
    status, ctype, body = answer(node(), "/health")
    assert (status, ctype, json.loads(body)) == (200, "application/json", {"health": "true", "reason": ""})
    assert answer(node(), "/readyz")[::2] == (200, b"ok\n")


def test_each_reason_makes_it_unhealthy():
    assert health.problems(node(leader_id=0)) == ["RAFT NO LEADER"]
    assert health.problems(node(sm=types.SimpleNamespace(alarms=frozenset({(3, "CORRUPT")})))) == ["ALARM CORRUPT"]
    assert health.problems(node(draining=True)) == ["SHUTTING DOWN"]
    stuck = node(wal_append_since=time.monotonic() - health.WAL_STUCK_S - 1)
    assert health.problems(stuck)[0].startswith("WAL FSYNC STUCK FOR ")
    assert health.problems(node(wal_append_since=time.monotonic())) == []  # under way, not stuck
    status, _ctype, body = answer(node(leader_id=0), "/health")
    assert (status, json.loads(body)) == (503, {"health": "false", "reason": "RAFT NO LEADER"})
    assert answer(node(leader_id=0), "/readyz")[::2] == (503, b"[-]RAFT NO LEADER\n")
    assert answer(node(leader_id=0), "/livez")[::2] == (200, b"ok\n")  # alive all the same


def test_fast_histogram_buckets_are_cumulative_with_inf_last():
    h = FastHistogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]  # le is inclusive, as Prometheus's
    assert h.count == 4 and abs(h.sum - 5.65) < 1e-9
