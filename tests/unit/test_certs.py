"""`kvstore certs init`: the files a TLS cluster needs, idempotent, and `--renew` keeps the CA."""
from __future__ import annotations

import ipaddress
import os
import stat
import ssl

from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvstore import certs
from kvstore.cli import main as cli_main


def load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def usages(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_init_makes_a_ca_and_per_member_server_and_peer_certificates(tmp_path):
    d = certs.init(str(tmp_path / "tls"), nodes=2, hosts=["10.0.0.7", "kv.example"])
    ca = load(d.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for i in (1, 2):
        for path, want in ((d.node_cert(i), {ExtendedKeyUsageOID.SERVER_AUTH}),
                           (d.peer_cert(i), {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})):
            cert = load(path)
            assert cert.issuer == ca.subject and usages(cert) == want
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)
            assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
            assert {"localhost", "kv.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert usages(load(d.client_cert)) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    for key in (d.ca_key, d.node_key(1), d.peer_key(2), d.client_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    # what OpenSSL itself thinks: each leaf verifies against the CA, with its key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d.node_cert(1), d.node_key(1))
    ctx.load_verify_locations(d.ca_cert)


def test_init_again_keeps_everything_and_renew_reissues_leaves_from_the_same_ca(tmp_path):
    d = certs.init(str(tmp_path / "tls"), nodes=1)
    first = {p: load(p).serial_number for p in (d.ca_cert, d.node_cert(1), d.peer_cert(1), d.client_cert)}
    certs.init(d.path, nodes=1)
    assert {p: load(p).serial_number for p in first} == first
    certs.init(d.path, nodes=1, renew=True)
    after = {p: load(p).serial_number for p in first}
    assert after[d.ca_cert] == first[d.ca_cert]
    assert all(after[p] != first[p] for p in first if p != d.ca_cert)
    assert load(d.node_cert(1)).issuer == load(d.ca_cert).subject


def test_the_cli_command_prints_how_to_use_the_files(tmp_path):
    r = CliRunner().invoke(cli_main, ["certs", "init", str(tmp_path / "tls"), "--nodes", "2", "--hosts", "a,b"])
    assert r.exit_code == 0, r.output
    assert "--peer-cert-file" in r.output and "--cacert" in r.output
    assert os.path.exists(tmp_path / "tls" / "node2-peer.crt")
    bad = CliRunner().invoke(cli_main, ["certs", "init", str(tmp_path / "x"), "--nodes", "0"])
    assert bad.exit_code != 0 and "--nodes" in bad.output
