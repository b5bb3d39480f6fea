"""A real Prometheus (Debian's /usr/bin/prometheus) scraping a real 3-member cluster with the shipped rules.

Kill a member: kvstoreMembersDown fires, and resolves once it is back. Cut the
leader off from the others: kvstoreNoLeader fires and the others elect a new
leader; after the heal every alert resolves. Every PromQL expression of the
alert rules and of the Grafana dashboard evaluates without error, and returns
data. The rules run as shipped except their `for:` durations (10 minutes and
the like), which shrink to one second here; scrapes and evaluations run every
second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse

import pytest
import yaml

from kvstore.client import Client
from kvstore.jepsen.proxy import free_port
from tests.integration.metrics_cluster import http_get, proxied_cluster

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install "
                                                            "prometheus; `make system-deps` does it as root)")


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(open(os.path.join(DEPLOY, "prometheus", "alerts.yml")))
    return {f"{r['alert']}/{i}": r["expr"] for g in doc["groups"] for i, r in enumerate(g["rules"])}


def dashboard_exprs() -> dict[str, str]:
    doc = json.load(open(os.path.join(DEPLOY, "grafana", "kvstore-dashboard.json")))
    return {f"{p['title']}/{t['refId']}": t["expr"] for p in doc["panels"] for t in p.get("targets", [])}


class Prometheus:
    def __init__(self, workdir: str, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = open(os.path.join(DEPLOY, "prometheus", "alerts.yml")).read()
        with open(os.path.join(workdir, "alerts.yml"), "w") as f:
            f.write(re.sub(r"(?m)^(\s+for: )\S+$", r"\g<1>1s", rules))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "kvstore", "static_configs": [{"targets": targets}]}],
        }
        with open(os.path.join(workdir, "prometheus.yml"), "w") as f:
            yaml.safe_dump(config, f)
        self.log = open(os.path.join(workdir, "prometheus.log"), "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir}/prometheus.yml", f"--storage.tsdb.path={workdir}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def api(self, path: str, **params: str) -> dict:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body) if body.startswith("{") else {"status": "error", "error": body}
        assert status == 200 and doc["status"] == "success", f"{path} {params}: {status} {doc}"
        return doc["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.25)


def test_prometheus_scrapes_evaluates_and_alerts(tmp_path):
    with proxied_cluster(str(tmp_path / "cluster")) as (lc, net):
        prom = Prometheus(str(tmp_path), [lc.metrics_addrs[i] for i in lc.ids])
        try:
            wait(lambda: http_get(f"{prom.url}/-/ready")[0] == 200, 30, "Prometheus ready")
            wait(lambda: len(prom.query('up{job="kvstore"} == 1')) == 3, 30, "all three members scraped")
            with Client(lc.endpoints) as c:
                for i in range(20):
                    c.put(f"p{i}", "v")
                c.get("p1")
            # Rates need two samples of the traffic above in their window.
            wait(lambda: prom.query('sum(increase(kvstore_grpc_server_handled_total{grpc_method="Put"}[1m])) > 0'),
                 30, "the puts in a rate")

            for expr in {**rule_exprs(), **dashboard_exprs()}.values():
                prom.query(expr)  # evaluates without error (api() asserts it)
            for name, expr in dashboard_exprs().items():
                assert prom.query(expr), f"dashboard panel {name} returns no data: {expr}"
            for name, expr in rule_exprs().items():  # an alert's expression is empty while it holds not:
                for metric in set(re.findall(r"\b(?:kvstore_\w+|up)\b(?=\{)", expr)):  # its series must exist
                    assert prom.query(metric), f"rule {name}: no series {metric}"
            assert prom.firing() == set()

            leader = lc.wait_for_leader(30)
            victim = next(i for i in lc.ids if i != leader)
            lc.kill(victim)
            wait(lambda: "kvstoreMembersDown" in prom.firing(), 30, f"kvstoreMembersDown after killing {victim}")
            lc.start_node(victim)
            wait(lambda: "kvstoreMembersDown" not in prom.firing(), 30, "kvstoreMembersDown resolved")

            leader = lc.wait_for_leader(30)
            changes_before = float(prom.query("max(kvstore_server_leader_changes_seen_total)")[0]["value"][1])
            net.partition({leader: [i for i in lc.ids if i != leader]})
            try:
                wait(lambda: "kvstoreNoLeader" in prom.firing(), 30, f"kvstoreNoLeader with leader {leader} cut off")
                lc.wait_for_leader(30, exclude=leader)
                wait(lambda: float(prom.query("max(kvstore_server_leader_changes_seen_total)")[0]["value"][1])
                     > changes_before, 30, "a leader change seen")
            finally:
                net.heal()
            wait(lambda: not prom.firing(), 30, "every alert resolved after the heal")
        finally:
            prom.stop()
