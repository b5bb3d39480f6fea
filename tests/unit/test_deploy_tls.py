"""The TLS deploy files: every node command parses with TLS on, and every file it names is mounted.

The compose override must restate each member's whole command (compose
replaces `command`), and the Kubernetes StatefulSet must mount the secrets
its flags and its readiness probe read.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from kvstore.certs import CertDir
from kvstore.server.config import parse_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FILE_FLAGS = ("cert_file", "key_file", "trusted_ca_file", "peer_cert_file", "peer_key_file", "peer_trusted_ca_file")


def tls_files(cfg) -> list[str]:
    return [getattr(cfg, f) for f in FILE_FLAGS]


def test_compose_tls_override_runs_every_member_with_its_own_certificates():
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    base = {name: svc for name, svc in services.items() if name.startswith("node")}  # not prometheus, grafana
    override = yaml.safe_load((DEPLOY / "docker-compose.tls.yml").read_text())["services"]
    assert set(override) == set(base)
    certs = CertDir("/etc/kvstore/tls")
    for name, svc in override.items():
        cfg = parse_args(svc["command"])
        assert cfg.client_cert_auth and all(tls_files(cfg))
        assert (cfg.cert_file, cfg.key_file) == (certs.node_cert(cfg.id), certs.node_key(cfg.id))
        assert (cfg.peer_cert_file, cfg.peer_key_file) == (certs.peer_cert(cfg.id), certs.peer_key(cfg.id))
        assert cfg.trusted_ca_file == cfg.peer_trusted_ca_file == certs.ca_cert
        mounts = {v.split(":")[1] for v in svc["volumes"]}
        assert all(any(f.startswith(m + "/") for m in mounts) for f in tls_files(cfg)), (name, mounts)
        # the plain file's addresses, with https://
        plain = parse_args(base[name]["command"])
        assert (cfg.peers, cfg.clients) == (plain.peers, plain.clients)
        assert (cfg.listen_metrics_addr, cfg.corrupt_check_time) == (plain.listen_metrics_addr,
                                                                     plain.corrupt_check_time)


def test_kubernetes_tls_statefulset_mounts_what_its_flags_and_probe_read():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kvstore-tls.yaml").read_text())}
    sts = docs["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert set(secrets) <= set(mounts)
    secret_dirs = [mounts[n] for n in secrets]
    for ordinal in range(sts["spec"]["replicas"]):
        argv = shlex.split(container["args"][0].replace("$(( ${HOSTNAME##*-} + 1 ))", str(ordinal + 1)))
        cfg = parse_args(argv[3:])
        assert cfg.id == ordinal + 1 and cfg.client_cert_auth
        for f in tls_files(cfg):
            assert any(f.startswith(d + "/") for d in secret_dirs), f
        assert cfg.listen_metrics_addr.endswith(":2381")
    # The probes are the node's plain-HTTP endpoints: no certificate needed to ask.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 2381
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}


def test_cert_manager_certificates_are_the_secrets_the_statefulset_mounts():
    issued = {d["spec"]["secretName"] for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "cert-manager.yaml").read_text())
              if d["kind"] == "Certificate" and not d["spec"].get("isCA")}
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kvstore-tls.yaml").read_text())}
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    assert issued == {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
