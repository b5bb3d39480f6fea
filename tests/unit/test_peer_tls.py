"""Mutual TLS on the peer transport, over real sockets with certificates from `kvstore certs init`.

A member's peer port accepts only connections whose certificate the
cluster's CA signed: a process holding a certificate from another CA, or no
TLS at all, has nothing it sends stepped into raft. The control test turns
the check off (the test-only switch) and shows the same rogue's messages
then do arrive, so the refusal is the certificate check's doing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path

import pytest
import uvloop
from cryptography import x509

from kvstore import certs
from kvstore.server.peer_server import PeerServer
from kvstore.server.tls import PeerTLS, PeerTLSFiles, TLSConfigError
from kvstore.server.transport import Transport
from tests.unit.test_peer_transport import CLUSTER, DEADLINE_S, Receiver, _image, _snapshot_message, appends, \
    same, wait_until


run = uvloop.run  # the members' event loop: its accept and read order differs from asyncio's


@pytest.fixture(scope="module")
def cas(tmp_path_factory) -> tuple[certs.CertDir, certs.CertDir]:
    base = tmp_path_factory.mktemp("certs")
    return certs.init(str(base / "cluster"), nodes=2), certs.init(str(base / "other"), nodes=2)


@pytest.fixture
def port() -> int:
    from kvstore.launcher import free_ports

    return free_ports(1)[0]


def member_tls(d: certs.CertDir, i: int, trusted: certs.CertDir | None = None, **kw) -> PeerTLS:
    return PeerTLS(PeerTLSFiles(d.peer_cert(i), d.peer_key(i), (trusted or d).ca_cert), **kw)


class TLSSender:
    def __init__(self, port: int, tls: PeerTLS | None, snapshots=None) -> None:
        self.unreachable: list[int] = []
        self.snapshot_reports: list[tuple[int, bool]] = []
        self.reported = asyncio.Event()
        self.transport = Transport(1, CLUSTER, {2: f"127.0.0.1:{port}"}, report_unreachable=self.unreachable.append,
                                   report_snapshot=self._report, open_snapshot=snapshots.open_image if snapshots else None,
                                   tls=tls)
        self.peer = self.transport.peers[2]

    def _report(self, peer: int, ok: bool) -> None:
        self.snapshot_reports.append((peer, ok))
        self.reported.set()


async def keep_sending(sender: TLSSender, until, what: str) -> None:
    """Send appends every few ms until `until()` holds (a refused connection breaks and is redialled)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not until():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        sender.transport.send(appends(5))
        await asyncio.sleep(0.01)


def test_members_of_one_ca_exchange_messages_and_snapshots(tmp_path, port, cas):
    good, _ = cas

    async def main():
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node, tls=member_tls(good, 2))
        await server.start("127.0.0.1", port)
        leader_store, index, term = _image(tmp_path, 1500)  # ~3 MiB through TLS
        sender = TLSSender(port, member_tls(good, 1), leader_store)
        sender.transport.start()
        await wait_until(lambda: sender.peer.writer is not None, "the connection")
        assert sender.peer.writer.get_extra_info("ssl_object") is not None
        sent = appends(200)
        sender.transport.send(sent)
        await wait_until(lambda: len(node.stepped) == len(sent), "every message")
        assert all(same(a, b) for a, b in zip(sent, node.stepped))
        sender.transport.send([_snapshot_message(index, term)])
        await asyncio.wait_for(sender.reported.wait(), DEADLINE_S)
        assert sender.snapshot_reports == [(2, True)]
        await sender.transport.stop()
        await server.stop()

    run(main())


def refused_rogue(tmp_path, port, cas, caplog, rogue: PeerTLS | None, *, skip_verify: bool) -> Receiver:
    """Member 2's peer port; a rogue keeps sending until refused twice (or, unchecked, until heard)."""
    good, _ = cas
    caplog.set_level(logging.INFO, "kvstore.peer")

    def refusals() -> int:
        return sum("TLS handshake failed" in r.getMessage() for r in caplog.records)

    async def main() -> Receiver:
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node, tls=member_tls(good, 2, testing_skip_client_verify=skip_verify))
        await server.start("127.0.0.1", port)
        sender = TLSSender(port, rogue)
        sender.transport.start()
        try:
            await keep_sending(sender, lambda: refusals() >= 2 or bool(node.stepped), "a refusal or a message")
        finally:
            await sender.transport.stop()
            await server.stop()
        return node

    return run(main())


def test_a_peer_with_a_certificate_from_another_ca_is_refused(tmp_path, port, cas, caplog):
    good, other = cas
    # The rogue trusts the cluster's CA (so its own check of the server passes) but presents another CA's certificate.
    node = refused_rogue(tmp_path, port, cas, caplog, member_tls(other, 1, trusted=good), skip_verify=False)
    assert node.stepped == [], "a message from a peer certified by another CA was stepped"
    assert any("certificate" in r.getMessage().lower() for r in caplog.records
               if "TLS handshake failed" in r.getMessage()), [r.getMessage() for r in caplog.records]


def test_control_without_the_check_the_same_rogue_is_heard(tmp_path, port, cas, caplog):
    good, other = cas
    node = refused_rogue(tmp_path, port, cas, caplog, member_tls(other, 1, trusted=good), skip_verify=True)
    assert node.stepped, "the control expects the unchecked rogue's messages to arrive"


def test_a_plaintext_peer_is_refused(tmp_path, port, cas, caplog):
    node = refused_rogue(tmp_path, port, cas, caplog, None, skip_verify=False)
    assert node.stepped == []


def _served_serial(port: int, d: certs.CertDir) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(d.ca_cert)
    ctx.load_cert_chain(d.peer_cert(1), d.peer_key(1))
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def test_renewed_certificates_are_used_by_new_connections_without_a_restart(tmp_path, port):
    d = certs.init(str(tmp_path / "certs"), nodes=2)

    async def main():
        node = Receiver(2, str(tmp_path / "snap"))
        tls = member_tls(d, 2)
        server = PeerServer(node, tls=tls)
        await server.start("127.0.0.1", port)
        sender = TLSSender(port, member_tls(d, 1))
        sender.transport.start()
        await wait_until(lambda: sender.peer.writer is not None, "the connection")
        with open(d.peer_cert(2), "rb") as f:
            before = x509.load_pem_x509_certificate(f.read()).serial_number
        assert await asyncio.to_thread(_served_serial, port, d) == before
        certs.init(d.path, nodes=2, renew=True)
        with open(d.peer_cert(2), "rb") as f:
            after = x509.load_pem_x509_certificate(f.read()).serial_number
        assert after != before
        assert await asyncio.to_thread(_served_serial, port, d) == after
        # The established connection carries on, and a fresh one (the sender's, after a break) works with new files.
        sender.peer.writer.transport.abort()
        await wait_until(lambda: sender.unreachable, "the break")
        await wait_until(lambda: sender.peer.writer is not None, "the reconnect with renewed certificates")
        sender.transport.send(appends(3))
        await wait_until(lambda: len(node.stepped) == 3, "messages over the renewed connection")
        await sender.transport.stop()
        await server.stop()

    run(main())


def test_files_that_do_not_load_keep_the_loaded_certificates(tmp_path, caplog):
    d = certs.init(str(tmp_path / "certs"), nodes=1)
    tls = member_tls(d, 1)
    loaded = tls.server_context()
    other = certs.init(str(tmp_path / "other"), nodes=1)
    with open(other.peer_key(1), "rb") as f:  # half a rotation: a key that does not match the certificate
        wrong_key = f.read()
    (tmp_path / "wrong.key").write_bytes(wrong_key)
    os.replace(tmp_path / "wrong.key", d.peer_key(1))  # replaced by rename, as rotations do
    caplog.set_level(logging.WARNING, "kvstore.tls")
    assert tls.server_context() is loaded
    assert any("do not load" in r.getMessage() for r in caplog.records)
    certs.init(d.path, nodes=1, renew=True)  # the rotation completes
    assert tls.server_context() is not loaded


def test_missing_or_bad_files_at_start_name_the_file(tmp_path):
    d = certs.init(str(tmp_path / "certs"), nodes=1)
    with pytest.raises(TLSConfigError, match="nope.crt"):
        PeerTLS(PeerTLSFiles(str(tmp_path / "nope.crt"), d.peer_key(1), d.ca_cert))
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a certificate")
    with pytest.raises(TLSConfigError, match="bad.pem"):
        PeerTLS(PeerTLSFiles(d.peer_cert(1), d.peer_key(1), str(bad)))
    assert os.path.exists(d.ca_cert)


def test_a_dialler_that_does_not_trust_the_peer_says_so_once(tmp_path, port, cas, caplog):
    good, other = cas
    caplog.set_level(logging.INFO, "kvstore.transport")

    async def main() -> None:
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node, tls=member_tls(good, 2))
        await server.start("127.0.0.1", port)
        sender = TLSSender(port, member_tls(good, 1, trusted=other))  # trusts another CA than the server's
        sender.transport.start()
        await wait_until(lambda: len(sender.unreachable) >= 3, "several failed dials")
        await sender.transport.stop()
        await server.stop()
        assert node.stepped == []

    run(main())
    failures = [r.getMessage() for r in caplog.records if "TLS to member 2" in r.getMessage()]
    assert len(failures) == 1 and "certificate verify failed" in failures[0], failures


def test_rolling_to_a_new_ca_with_a_bundle_of_both(tmp_path, port, cas):
    """Mid-roll, members trust both CAs: one still on the old CA's certificate talks to one on the new CA's."""
    old, new = cas
    bundle = tmp_path / "both-cas.pem"
    bundle.write_bytes(Path(old.ca_cert).read_bytes() + Path(new.ca_cert).read_bytes())

    def member(d: certs.CertDir, i: int) -> PeerTLS:
        return PeerTLS(PeerTLSFiles(d.peer_cert(i), d.peer_key(i), str(bundle)))

    async def main() -> None:
        node = Receiver(2, str(tmp_path / "snap"))
        server = PeerServer(node, tls=member(new, 2))
        await server.start("127.0.0.1", port)
        sender = TLSSender(port, member(old, 1))
        sender.transport.start()
        await wait_until(lambda: sender.peer.writer is not None, "the connection")
        sender.transport.send(appends(3))
        await wait_until(lambda: len(node.stepped) == 3, "messages across the two CAs")
        await sender.transport.stop()
        await server.stop()

    run(main())
