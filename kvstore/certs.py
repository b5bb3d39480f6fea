"""`kvstore certs init`: a development CA and the certificates a cluster needs.

A directory made by `init` holds, all PEM (keys are ECDSA P-256, mode 0600):

    ca.crt ca.key                 the certificate authority
    node<i>.crt node<i>.key       member i's client-facing server certificate (--cert-file/--key-file)
    node<i>-peer.crt/.key         member i's peer certificate, both server and client (--peer-cert-file/...)
    client.crt client.key         a client certificate (the CLI's --cert/--key)

Every server and peer certificate names the same hosts (127.0.0.1, ::1 and
localhost, plus `--hosts`) as subject alternative names, because clients and
peers check the host they dialled against them. Running `init` again keeps
what exists; `--renew` issues fresh leaf certificates from the same CA, and
running members pick them up on their next connections (no restart). Files
are replaced by rename, so a member never reads half a file.

This is for development and tests: production brings its own CA (see the
README); the members only need the three files per listener.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
LEAF_DAYS = 825

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertDir:
    """Where each file of a certificate directory lives."""

    path: str

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def ca_cert(self) -> str:
        return self._p("ca.crt")

    @property
    def ca_key(self) -> str:
        return self._p("ca.key")

    def node_cert(self, i: int) -> str:
        return self._p(f"node{i}.crt")

    def node_key(self, i: int) -> str:
        return self._p(f"node{i}.key")

    def peer_cert(self, i: int) -> str:
        return self._p(f"node{i}-peer.crt")

    def peer_key(self, i: int) -> str:
        return self._p(f"node{i}-peer.key")

    @property
    def client_cert(self) -> str:
        return self._p("client.crt")

    @property
    def client_key(self) -> str:
        return self._p("client.key")

    def node_flags(self, i: int, client_cert_auth: bool = True) -> list[str]:
        """Member i's TLS flags for clients and peers."""
        flags = ["--cert-file", self.node_cert(i), "--key-file", self.node_key(i),
                 "--trusted-ca-file", self.ca_cert,
                 "--peer-cert-file", self.peer_cert(i), "--peer-key-file", self.peer_key(i),
                 "--peer-trusted-ca-file", self.ca_cert]
        return flags + (["--client-cert-auth"] if client_cert_auth else [])


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvstore"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(cn: str = "kvstore dev CA") -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key()
    cert = (_builder(_name(cn), _name(cn), key, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, PrivateKey], cn: str, *, server: bool, client: bool,
          hosts: Sequence[str] = ()) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf certificate signed by `ca`, for TLS servers and/or clients."""
    ca_cert, ca_key = ca
    key = _new_key()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    b = (_builder(_name(cn), ca_cert.subject, key, LEAF_DAYS)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                      crl_sign=False, content_commitment=False, data_encipherment=False,
                                      key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if hosts:
        b = b.add_extension(_san(hosts), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write(path: str, data: bytes, mode: int) -> None:
    """Replace `path` by rename, so a reader sees the old file or the new one, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_pair(cert_path: str, key_path: str, pair: tuple[x509.Certificate, PrivateKey]) -> None:
    """Write a certificate and its key (the key first: a reader pairing a new cert with an old key retries)."""
    cert, key = pair
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_ca(d: CertDir) -> tuple[x509.Certificate, PrivateKey]:
    with open(d.ca_cert, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(d.ca_key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{d.ca_key}: expected an EC private key")
    return cert, key


def init(path: str, nodes: int = 3, hosts: Sequence[str] = (), renew: bool = False) -> CertDir:
    """Create (or complete) a certificate directory; `renew` re-issues every leaf from the same CA."""
    if nodes < 1:
        raise ValueError("--nodes must be >= 1")
    d = CertDir(os.path.abspath(path))
    os.makedirs(d.path, mode=0o700, exist_ok=True)
    if os.path.exists(d.ca_cert):
        ca = load_ca(d)
    else:
        ca = make_ca()
        write_pair(d.ca_cert, d.ca_key, ca)
        renew = True  # leaves of another CA are useless now
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    for i in range(1, nodes + 1):
        if renew or not os.path.exists(d.node_cert(i)):
            write_pair(d.node_cert(i), d.node_key(i), issue(ca, f"node{i}", server=True, client=False, hosts=all_hosts))
        if renew or not os.path.exists(d.peer_cert(i)):
            write_pair(d.peer_cert(i), d.peer_key(i),
                       issue(ca, f"node{i}-peer", server=True, client=True, hosts=all_hosts))
    if renew or not os.path.exists(d.client_cert):
        write_pair(d.client_cert, d.client_key, issue(ca, "client", server=False, client=True))
    return d


@click.group("certs")
def certs() -> None:
    """Development certificates for a TLS cluster."""


@certs.command("init")
@click.argument("directory")
@click.option("--nodes", default=3, show_default=True, help="members to issue server and peer certificates for")
@click.option("--hosts", default="", help="extra host names or IPs the servers answer on, comma-separated")
@click.option("--renew", is_flag=True, help="issue fresh leaf certificates from the existing CA (rotation)")
def certs_init(directory: str, nodes: int, hosts: str, renew: bool) -> None:
    """Create a CA, a server and a peer certificate per member, and a client certificate in DIRECTORY."""
    try:
        d = init(directory, nodes, [h.strip() for h in hosts.split(",") if h.strip()], renew)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"certificates in {d.path}")
    click.echo(f"  member i:  kvstore serve --id i {' '.join(d.node_flags(1)).replace('node1', 'node<i>')}")
    click.echo(f"  CLI:       kvstore --cacert {d.ca_cert} --cert {d.client_cert} --key {d.client_key} ...")
