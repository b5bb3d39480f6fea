"""The client API's gRPC credentials: checked at start naming the file, fresh ones handed to gRPC once per change."""
from __future__ import annotations

import os

import pytest

from kvstore import certs
from kvstore.server.tls import ClientAPICredentials, ClientTLSFiles, TLSConfigError


def creds(d: certs.CertDir, **kw) -> ClientAPICredentials:
    return ClientAPICredentials(ClientTLSFiles(d.node_cert(1), d.node_key(1), d.ca_cert, **kw))


def test_the_fetcher_hands_grpc_a_new_configuration_once_per_change(tmp_path):
    d = certs.init(str(tmp_path / "tls"), nodes=1)
    c = creds(d, client_cert_auth=True)
    assert c.server_credentials() is not None
    assert c._fetch() is None  # unchanged: gRPC keeps what it has
    certs.init(d.path, nodes=1, renew=True)
    assert c._fetch() is not None
    assert c._fetch() is None


def test_a_key_that_does_not_match_is_refused_at_start_and_kept_out_later(tmp_path):
    d = certs.init(str(tmp_path / "tls"), nodes=1)
    other = certs.init(str(tmp_path / "other"), nodes=1)
    with pytest.raises(TLSConfigError, match="does not match"):
        ClientAPICredentials(ClientTLSFiles(d.node_cert(1), other.node_key(1)))
    c = creds(d)
    os.replace(certs.CertDir(other.path).node_key(1), d.node_key(1))  # half a rotation
    assert c._fetch() is None  # the loaded credentials stay
    certs.init(d.path, nodes=1, renew=True)
    assert c._fetch() is not None


def test_unreadable_or_bad_files_are_named(tmp_path):
    d = certs.init(str(tmp_path / "tls"), nodes=1)
    with pytest.raises(TLSConfigError, match="nope.crt"):
        ClientAPICredentials(ClientTLSFiles(str(tmp_path / "nope.crt"), d.node_key(1)))
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match="ca.pem"):
        ClientAPICredentials(ClientTLSFiles(d.node_cert(1), d.node_key(1), str(bad)))
