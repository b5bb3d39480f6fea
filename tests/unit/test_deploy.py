"""The deploy files parse, and every flag and port they use is one the CLI accepts.

Each node command line found in deploy/ is run through the real `kvstore
serve` argument parser (kvstore.server.config.parse_args), so a renamed or
misspelt flag breaks this test rather than a production rollout.
"""
from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kvstore.server.config import parse_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def serve_config(argv: list[str]):
    """Parse a `kvstore serve` command line exactly as the node would."""
    return parse_args(argv)


def test_the_parser_rejects_an_unknown_flag():
    # The check below would be worthless if unknown flags were ignored.
    with pytest.raises(SystemExit):
        serve_config(["--id", "1", "--no-such-flag", "x"])


def test_dockerfile_entrypoint_and_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry == ["kvstore", "serve"]
    cfg = serve_config(cmd)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
    assert {port_of(cfg.listen_client_addr), port_of(cfg.listen_peer_addr),
            port_of(cfg.listen_metrics_addr)} == exposed


def test_compose_three_members_agree():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = doc["services"]
    nodes = {name: svc for name, svc in services.items() if name.startswith("node")}
    assert len(nodes) == 3 and set(services) - set(nodes) == {"prometheus", "grafana"}
    ids, clusters, metrics_targets = set(), set(), set()
    for name, svc in nodes.items():
        cfg = serve_config(svc["command"])
        ids.add(cfg.id)
        clusters.add(tuple(sorted(cfg.peers.items())))
        assert name in cfg.peers[cfg.id], "a member must advertise its own host name"
        published = {int(p.split(":")[1]) for p in svc["ports"]}
        assert published == {port_of(cfg.listen_client_addr), port_of(cfg.listen_metrics_addr)}
        # The advertised client address is the host port the service publishes.
        host_port = int(svc["ports"][0].split(":")[0])
        assert port_of(cfg.clients[cfg.id]) == host_port
        metrics_targets.add(f"{name}:{port_of(cfg.listen_metrics_addr)}")
    assert ids == {1, 2, 3}
    assert len(clusters) == 1, "every member must be given the same --initial-cluster"
    # Prometheus scrapes every member's metrics port and loads the shipped rules.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert set(job["static_configs"][0]["targets"]) == metrics_targets
    assert prom["rule_files"] == ["alerts.yml"]
    mounted = {v.split(":")[0] for v in services["prometheus"]["volumes"] + services["grafana"]["volumes"]}
    for path in mounted - {"prometheus", "grafana"}:  # named volumes aside, each mount is a file in deploy/
        assert (DEPLOY / path).exists(), path
    json.loads((DEPLOY / "grafana" / "kvstore-dashboard.json").read_text())


def k8s_docs():
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kvstore.yaml").read_text())}


def test_kubernetes_statefulset_members_parse_for_each_ordinal():
    docs = k8s_docs()
    assert docs["Service"]["spec"]["clusterIP"] == "None"
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    sts = docs["StatefulSet"]
    assert sts["spec"]["serviceName"] == docs["Service"]["metadata"]["name"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert ports == service_ports
    for ordinal in range(sts["spec"]["replicas"]):
        line = script.replace("$(( ${HOSTNAME##*-} + 1 ))", str(ordinal + 1))
        argv = shlex.split(line)
        assert argv[:3] == ["exec", "kvstore", "serve"]
        cfg = serve_config(argv[3:])
        assert cfg.id == ordinal + 1
        assert cfg.peers[cfg.id].startswith(f"kvstore-{ordinal}.")
        assert port_of(cfg.listen_client_addr) == ports["client"]
        assert port_of(cfg.listen_peer_addr) == ports["peer"]
        assert port_of(cfg.listen_metrics_addr) == ports["metrics"]
    # The probes are the node's own HTTP endpoints, on the port it serves them on.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    from kvstore.server.http_endpoints import HttpEndpoints

    assert {"/readyz", "/livez"} <= set(HttpEndpoints.PATHS)


def test_systemd_unit_with_example_config(tmp_path):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd" / "kvstore@.service")
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    argv = shlex.split(unit["Service"]["ExecStart"].replace("%i", "1"))
    assert Path(argv[0]).name == "kvstore" and argv[1] == "serve"
    config = tmp_path / "node1.toml"
    config.write_text((DEPLOY / "systemd" / "node1.toml.example").read_text())
    argv = [str(config) if a == "/etc/kvstore/node1.toml" else a for a in argv[2:]]
    cfg = serve_config(argv)
    assert cfg.id == 1 and len(cfg.peers) == 3
