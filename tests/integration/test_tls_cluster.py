"""A real 3-member cluster with client TLS (--client-cert-auth) and mutual peer TLS.

Each refusal ends with the same checks: nothing was applied (the revision
did not move), no member exited, and every member still answers. The rogue
peer's message is a heartbeat at a far higher term: stepped, it would
depose the leader, so an unchanged term after the refusal is logged shows
they never reached raft (tests/unit/test_peer_tls.py shows the same rogue is
heard when the certificate check is switched off).
"""
from __future__ import annotations

import socket
import ssl

import pytest
from cryptography import x509

from kvstore import certs
from kvstore.client import TLS, Client, KvstoreError
from kvstore.raft.types import Message, MessageType
from kvstore.server import peer_wire as wire
from kvstore.launcher import LocalCluster
from kvstore.server.raft_codec import message_to_pb
from kvstore.v1 import raft_pb2

DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[certs.CertDir, certs.CertDir]:
    base = tmp_path_factory.mktemp("certs")
    return certs.init(str(base / "cluster"), nodes=3), certs.init(str(base / "other"), nodes=3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dirs):
    lc = LocalCluster.with_free_ports(str(tmp_path_factory.mktemp("tls-cluster")), certs=dirs[0])
    lc.start()
    try:
        lc.wait_for_leader(DEADLINE_S)
        yield lc
    finally:
        lc.stop()


def revision(lc: LocalCluster) -> int:
    with Client(lc.endpoints, tls=lc.client_tls(), timeout=20) as c:
        return c.get("probe").revision


def all_members_answer(lc: LocalCluster) -> None:
    lc.check_alive()
    lc.wait_for(lambda: all(s is not None for s in lc.statuses(2.0).values()), DEADLINE_S, "every member answering")


def refused(lc: LocalCluster, tls: TLS | None) -> str:
    """Try a put with `tls`; it must fail. Returns the error's text."""
    before = revision(lc)
    with pytest.raises(KvstoreError) as info:
        with Client(lc.endpoints, tls=tls, timeout=2) as c:
            c.put("refused", "x")
    assert revision(lc) == before, "a refused client's write was applied"
    all_members_answer(lc)
    return str(info.value)


def test_a_tls_client_with_https_endpoints_writes_and_reads(cluster):
    with Client([f"https://{e}" for e in cluster.endpoints], tls=cluster.client_tls(), timeout=20) as c:
        r = c.put("greeting", "hello")
        assert c.get("greeting").value == b"hello"
        assert c.get("greeting", serializable=True).kv.mod_revision <= r.revision


def test_the_member_list_says_https(cluster):
    with Client(cluster.endpoints, tls=cluster.client_tls(), timeout=20) as c:
        members = c.members()
    assert {m.client_urls[0] for m in members} == {f"https://{e}" for e in cluster.endpoints}
    assert all(m.peer_urls[0].startswith("https://") for m in members)


def test_a_plaintext_client_is_refused(cluster):
    assert "Socket closed" in refused(cluster, None)


def test_a_client_trusting_another_ca_is_refused(cluster, dirs):
    good, other = dirs
    msg = refused(cluster, TLS(ca=other.ca_cert, cert=good.client_cert, key=good.client_key))
    assert "CERTIFICATE_VERIFY_FAILED" in msg, msg


def test_a_client_without_a_certificate_is_refused(cluster, dirs):
    refused(cluster, TLS(ca=dirs[0].ca_cert))


def test_a_client_certificate_from_another_ca_is_refused(cluster, dirs):
    good, other = dirs
    refused(cluster, TLS(ca=good.ca_cert, cert=other.client_cert, key=other.client_key))


def _log_count(lc: LocalCluster, i: int, needle: str) -> int:
    with open(lc.log_path(i), "rb") as f:
        return f.read().decode(errors="replace").count(needle)


def _rogue_heartbeat(lc: LocalCluster, leader: int, term: int, ctx: ssl.SSLContext) -> str:
    """Dial the leader's peer port as another member and send a heartbeat at term + 100.

    Stepped, it would make the leader a follower of the higher term. Returns
    "refused" (the handshake failed or the member closed the connection) or
    "open" (the member kept reading).
    """
    host, port = lc.peer_addr(leader).rsplit(":", 1)
    frm = next(i for i in lc.ids if i != leader)
    beat = [message_to_pb(Message(type=MessageType.HEARTBEAT, to=leader, frm=frm, term=term + 100))]
    batch = raft_pb2.RaftBatch(cluster_id=0, messages=beat)
    setattr(batch, "from", frm)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(wire.hello(wire.STREAM, 0, frm) + wire.frame(wire.BATCH, batch.SerializeToString()))
                return "refused" if s.recv(1) == b"" else "answered"
    except (ssl.SSLError, ConnectionError):
        return "refused"  # the member's alert or reset
    except TimeoutError:
        return "open"


def test_a_peer_with_a_certificate_from_another_ca_is_refused_on_the_peer_port(cluster, dirs):
    good, other = dirs
    leader = cluster.wait_for_leader(DEADLINE_S)
    term = cluster.status(leader, 5.0).term
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(good.ca_cert)  # it trusts the cluster, but its certificate is another CA's
    ctx.load_cert_chain(other.peer_cert(2), other.peer_key(2))
    refusals = _log_count(cluster, leader, "TLS handshake failed")
    outcome = _rogue_heartbeat(cluster, leader, term, ctx)
    terms = {i: s and s.term for i, s in cluster.statuses(5.0).items()}
    assert outcome == "refused", f"the peer port took a rogue's connection ({outcome}); terms {term} -> {terms}"
    cluster.wait_for(lambda: _log_count(cluster, leader, "TLS handshake failed") > refusals, DEADLINE_S,
                     "the leader to log the refusal")
    assert all(t == term for t in terms.values()), f"terms moved from {term}: {terms}"
    assert cluster.leader() == leader
    all_members_answer(cluster)


def _served_serial(addr: str, d: certs.CertDir, client_cert: str, client_key: str, alpn: list[str]) -> int:
    host, port = addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(d.ca_cert)
    ctx.load_cert_chain(client_cert, client_key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def _file_serial(path: str) -> int:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def test_certificates_rotate_without_a_restart(cluster, dirs):
    d = dirs[0]
    pids = {i: cluster.pid(i) for i in cluster.ids}

    def served() -> dict[str, int]:
        out = {}
        for i in cluster.ids:
            out[f"client{i}"] = _served_serial(cluster.client_addr(i), d, d.client_cert, d.client_key, ["h2"])
            out[f"peer{i}"] = _served_serial(cluster.peer_addr(i), d, d.peer_cert(1), d.peer_key(1), [])
        return out

    def files() -> dict[str, int]:
        out = {}
        for i in cluster.ids:
            out[f"client{i}"] = _file_serial(d.node_cert(i))
            out[f"peer{i}"] = _file_serial(d.peer_cert(i))
        return out

    old = files()
    assert served() == old
    certs.init(d.path, nodes=3, renew=True)
    new = files()
    assert not set(old.values()) & set(new.values())
    assert served() == new, "a new connection was served the old certificate"
    # Clients with the renewed client certificate work; the established peer connections carried on.
    with Client(cluster.endpoints, tls=cluster.client_tls(), timeout=20) as c:
        r = c.put("rotated", "yes")
        assert c.get("rotated").value == b"yes" and r.revision > 0
    # A member restarted now dials its peers with its renewed certificate, and they accept it.
    cluster.restart(3)
    with Client(cluster.endpoints, tls=cluster.client_tls(), timeout=20) as c:
        r = c.put("after-restart", "yes")

    def caught_up() -> bool:
        s = cluster.status(3, 2.0)
        return s is not None and s.header.revision >= r.revision

    cluster.wait_for(caught_up, DEADLINE_S, "member 3 to catch up over renewed peer certificates")
    assert {i: cluster.pid(i) for i in (1, 2)} == {i: pids[i] for i in (1, 2)}, "a member restarted"
    all_members_answer(cluster)
