"""TLS settings of a node: etcd's flag names, https:// URLs, and combinations refused with one clear line."""
from __future__ import annotations

import pytest

from kvstore.server.config import parse_args, parse_members

HTTPS_PEERS = "1=https://127.0.0.1:2380,2=https://127.0.0.1:2480"
HTTPS_CLIENTS = "1=https://127.0.0.1:2379,2=https://127.0.0.1:2479"
PEER_FLAGS = ["--peer-cert-file", "p.crt", "--peer-key-file", "p.key", "--peer-trusted-ca-file", "ca.crt"]
CLIENT_FLAGS = ["--cert-file", "s.crt", "--key-file", "s.key"]


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(argv)
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_https_urls_with_tls_flags_parse_to_plain_addresses():
    cfg = parse_args(["--initial-cluster", HTTPS_PEERS, "--initial-cluster-clients", HTTPS_CLIENTS,
                      "--listen-client-addr", "https://0.0.0.0:2379", *PEER_FLAGS, *CLIENT_FLAGS,
                      "--trusted-ca-file", "ca.crt", "--client-cert-auth"])
    assert cfg.peers == {1: "127.0.0.1:2380", 2: "127.0.0.1:2480"}
    assert cfg.clients == {1: "127.0.0.1:2379", 2: "127.0.0.1:2479"}
    assert cfg.listen_client_addr == "0.0.0.0:2379" and cfg.listen_peer_addr == "127.0.0.1:2380"
    assert (cfg.cert_file, cfg.key_file, cfg.trusted_ca_file, cfg.client_cert_auth) == ("s.crt", "s.key", "ca.crt", True)
    assert (cfg.peer_cert_file, cfg.peer_key_file, cfg.peer_trusted_ca_file) == ("p.crt", "p.key", "ca.crt")


def test_bare_addresses_follow_the_flags():
    cfg = parse_args([*PEER_FLAGS, *CLIENT_FLAGS])
    assert cfg.peer_cert_file and cfg.cert_file and cfg.peers[1] == "127.0.0.1:2380"


def test_parse_members_accepts_schemes():
    assert parse_members("1=http://a:1,2=https://b:2/") == {1: "a:1", 2: "b:2"}


@pytest.mark.parametrize("argv, named", [
    (["--initial-cluster", HTTPS_PEERS, "--initial-cluster-clients", HTTPS_CLIENTS.replace("https", "http")],
     "--peer-cert-file"),
    (["--initial-cluster-clients", "1=https://127.0.0.1:2379,2=https://127.0.0.1:2479,3=https://127.0.0.1:2579"],
     "--cert-file"),
    (["--peer-cert-file", "p.crt", "--peer-key-file", "p.key"], "--peer-trusted-ca-file"),
    (["--cert-file", "s.crt"], "--key-file"),
    ([*CLIENT_FLAGS, "--client-cert-auth"], "--trusted-ca-file"),
    (["--trusted-ca-file", "ca.crt"], "--cert-file"),
    ([*PEER_FLAGS, "--initial-cluster", "1=http://127.0.0.1:2380"], "http://"),
    ([*CLIENT_FLAGS, "--listen-client-addr", "http://127.0.0.1:2379"], "http://"),
])
def test_inconsistent_tls_settings_are_refused_naming_the_flag(argv, named, capsys):
    line = refused(argv, capsys)
    assert named in line, line


def test_tls_settings_from_a_config_file(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('cert-file = "s.crt"\nkey-file = "s.key"\ntrusted-ca-file = "ca.crt"\nclient-cert-auth = true\n')
    cfg = parse_args(["--config", str(f)])
    assert cfg.client_cert_auth and cfg.cert_file == "s.crt"


def test_make_config_keeps_tls_off_by_default():
    cfg = parse_args([])
    assert not (cfg.cert_file or cfg.peer_cert_file or cfg.client_cert_auth or cfg.testing_peer_skip_client_verify)
