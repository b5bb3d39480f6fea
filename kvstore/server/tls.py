"""TLS for the client API (gRPC) and the peer API (asyncio TCP), with certificates that rotate.

Both listeners re-read their files when they change: every new connection
first compares the files' (inode, mtime, size) with what was loaded, and a
change loads them again, so replacing the files (say, by a cert-manager
renewal or `kvstore certs init --renew`) takes effect without a restart while
established connections carry on. Files that do not load (a key that does not
match its certificate yet, half a rotation) keep the previous credentials and
are tried again on the next connection; at start they stop the node with one
line naming the file.

Peer TLS is always mutual: each side presents its peer certificate and checks
the other's against --peer-trusted-ca-file, and the dialling side also checks
that the certificate names the host it dialled.
"""
from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, cast
from collections.abc import Callable

import grpc

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("kvstore.tls")

T = TypeVar("T")


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be used (the message names it)."""


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {path}: {e.strerror or e}") from e


class Reloading(Generic[T]):
    """A value built from files, rebuilt when one of them changes (checked on each `get`)."""

    def __init__(self, what: str, paths: tuple[str, ...], build: Callable[[], T]) -> None:
        self.what = what
        self.paths = paths
        self._build = build
        self._sig = _signature_or_error(paths)
        self.value: T = build()  # TLSConfigError at start: the caller stops the node
        self.reloads = 0

    def get(self) -> tuple[T, bool]:
        """The current value, and whether it was just rebuilt."""
        try:
            sig = _signature(self.paths)
        except OSError as e:
            log.warning("%s: keeping the loaded certificates, cannot stat: %s", self.what, e)
            return self.value, False
        if sig == self._sig:
            return self.value, False
        try:
            value = self._build()
        except (TLSConfigError, ssl.SSLError, ValueError) as e:
            log.warning("%s: keeping the loaded certificates, the changed files do not load: %s", self.what, e)
            return self.value, False
        self.value, self._sig = value, sig
        self.reloads += 1
        log.info("%s: certificates reloaded from %s", self.what, ", ".join(self.paths))
        return value, True


def _signature_or_error(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    try:
        return _signature(paths)
    except OSError as e:
        raise TLSConfigError(f"cannot read {e.filename}: {e.strerror or e}") from e


def _check_pair(cert: bytes, key: bytes, cert_file: str, key_file: str) -> None:
    """The PEM certificate parses and `key` is its private key (TLSConfigError naming the files otherwise)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
    except ValueError as e:
        raise TLSConfigError(f"cannot load certificate {cert_file}: {e}") from e
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"cannot load key {key_file}: {e}") from e
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*fmt) != public.public_bytes(*fmt):
        raise TLSConfigError(f"key {key_file} does not match certificate {cert_file}")


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"cannot load certificate {cert_file} with key {key_file}: {e}") from e


def _load_ca(ctx: ssl.SSLContext, ca_file: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"cannot load CA file {ca_file}: {e}") from e


# ------------------------------------------------------------------------------ the client API


@dataclass(frozen=True)
class ClientTLSFiles:
    cert_file: str
    key_file: str
    trusted_ca_file: str = ""
    client_cert_auth: bool = False


class ClientAPICredentials:
    """gRPC server credentials for the client API; gRPC asks for fresh ones at each handshake."""

    def __init__(self, files: ClientTLSFiles) -> None:
        self.files = files
        paths = (files.cert_file, files.key_file) + ((files.trusted_ca_file,) if files.trusted_ca_file else ())
        self._config = Reloading("client API TLS", paths, self._build)

    def _build(self) -> grpc.ServerCertificateConfiguration:
        """Read each file once and check those very bytes: gRPC would only fail at a handshake, unnamed."""
        f = self.files
        cert, key = read_file(f.cert_file), read_file(f.key_file)
        _check_pair(cert, key, f.cert_file, f.key_file)
        ca = None
        if f.trusted_ca_file:
            ca = read_file(f.trusted_ca_file)
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except ssl.SSLError as e:
                raise TLSConfigError(f"cannot load CA file {f.trusted_ca_file}: {e}") from e
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        config, changed = self._config.get()
        return config if changed else None  # None: gRPC keeps what it has

    def server_credentials(self) -> grpc.ServerCredentials:
        # The stub's fetcher type omits the None that gRPC documents as "keep the current configuration".
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._config.value, fetch, require_client_authentication=self.files.client_cert_auth)


# ------------------------------------------------------------------------------ the peer API


@dataclass(frozen=True)
class PeerTLSFiles:
    cert_file: str
    key_file: str
    trusted_ca_file: str


class PeerTLS:
    """SSL contexts for both ends of peer connections, rebuilt when the files change."""

    def __init__(self, files: PeerTLSFiles, *, testing_skip_client_verify: bool = False) -> None:
        self.files = files
        self.testing_skip_client_verify = testing_skip_client_verify
        self._contexts = Reloading("peer TLS", (files.cert_file, files.key_file, files.trusted_ca_file), self._build)

    def _build(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        f = self.files
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its host name
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            _load_chain(ctx, f.cert_file, f.key_file)
            _load_ca(ctx, f.trusted_ca_file)
        server.verify_mode = ssl.CERT_NONE if self.testing_skip_client_verify else ssl.CERT_REQUIRED
        return server, client

    def server_context(self) -> ssl.SSLContext:
        return self._contexts.get()[0][0]

    def client_context(self) -> ssl.SSLContext:
        return self._contexts.get()[0][1]


def client_api_credentials(cfg: ServerConfig) -> ClientAPICredentials | None:
    if not cfg.cert_file:
        return None
    return ClientAPICredentials(ClientTLSFiles(cfg.cert_file, cfg.key_file, cfg.trusted_ca_file,
                                               cfg.client_cert_auth))


def peer_tls(cfg: ServerConfig) -> PeerTLS | None:
    if not cfg.peer_cert_file:
        return None
    return PeerTLS(PeerTLSFiles(cfg.peer_cert_file, cfg.peer_key_file, cfg.peer_trusted_ca_file),
                   testing_skip_client_verify=cfg.testing_peer_skip_client_verify)
