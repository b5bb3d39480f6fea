"""Authentication and RBAC on a real 3-member TLS cluster with auth enabled.

Each refusal ends with the same checks: nothing was applied (the revision did
not move), no member exited, and every member still answers. The teeth: a
cluster started with --testing-auth-skip-txn-check (ops inside a txn are not
checked) lets the hidden write through, which is what
test_a_write_hidden_in_a_txn_is_refused_and_nothing_of_the_txn_applies catches.
"""
from __future__ import annotations

import base64
import time

import grpc
import pytest
from click.testing import CliRunner

from kvstore import certs
from kvstore.cli import main as cli_main
from kvstore.client import Client, KvstoreError, PermissionDenied, Unauthenticated
from kvstore.client.txn import Txn, get, put
from kvstore.launcher import LocalCluster
from kvstore.v1 import auth_pb2, auth_pb2_grpc, kv_pb2, kv_pb2_grpc

DEADLINE_S = 60.0
TOKEN_TTL_S = 4


def set_up_auth(lc: LocalCluster, tls) -> None:
    """root, a role `app` with readwrite on the prefix app/, users alice (app) and mallory (nothing)."""
    with Client(lc.endpoints, tls=tls, timeout=30) as c:
        with pytest.raises(KvstoreError, match="root user does not exist"):
            c.auth_enable()
        c.user_add("root", "root-pw")
        c.role_add("app")
        c.role_grant_permission("app", "readwrite", "app/", prefix=True)
        c.user_add("alice", "alice-pw")
        c.user_grant_role("alice", "app")
        c.user_add("mallory", "mallory-pw")
        with Client(lc.endpoints, tls=tls, timeout=30, user="alice", password="alice-pw") as a:
            a.put("before-auth", "1")  # credentials on a cluster without auth: calls go without a token
        c.auth_enable()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("auth-cluster")
    lc = LocalCluster.with_free_ports(str(base / "cluster"), certs=certs.init(str(base / "certs"), nodes=3),
                                      extra_args=["--auth-token-ttl", str(TOKEN_TTL_S), "--corrupt-check-time", "1s"])
    lc.start()
    try:
        lc.wait_for_leader(DEADLINE_S)
        set_up_auth(lc, lc.client_tls())
        yield lc
    finally:
        lc.stop()


def client(lc: LocalCluster, user: str | None = None, password: str | None = None, endpoints=None, **kw) -> Client:
    return Client(endpoints or lc.endpoints, tls=lc.client_tls(), timeout=30, user=user,
                  password=password, **kw)


def revision(lc: LocalCluster) -> int:
    with client(lc, "root", "root-pw") as c:
        return c.get("probe").revision


def all_members_answer(lc: LocalCluster) -> None:
    lc.check_alive()
    lc.wait_for(lambda: all(s is not None for s in lc.statuses(2.0).values()), DEADLINE_S, "every member answering")


CLIENT_KINDS = {
    "stream+batch": dict(),  # the default: session streams, calls coalesced into Batch
    "unary": dict(transport="unary", coalesce=False),
}


@pytest.mark.parametrize("kind", list(CLIENT_KINDS))
def test_a_user_writes_inside_its_prefix_only(cluster, kind):
    before = revision(cluster)
    with client(cluster, "alice", "alice-pw", **CLIENT_KINDS[kind]) as a:
        # Refused first: the request that would have opened the client's session never applied,
        # and the client's next write still goes through (under a new session).
        with pytest.raises(PermissionDenied, match="user 'alice' has no write permission on 'other/x'"):
            a.put("other/x", "1")
        r = a.put("app/x", kind)
        assert a.get("app/x").value == kind.encode()
        with pytest.raises(PermissionDenied, match="no read permission on 'other/x'"):
            a.get("other/x")
        with pytest.raises(PermissionDenied, match="no read permission"):
            a.range("app", prefix=True)  # reaches beyond app/
        assert [kv.key for kv in a.range("app/", prefix=True).kvs] == [b"app/x"]
    assert r.revision == before + 1
    assert revision(cluster) == before + 1, "a refused write was applied"
    all_members_answer(cluster)


@pytest.mark.parametrize("kind", list(CLIENT_KINDS))
def test_a_write_hidden_in_a_txn_is_refused_and_nothing_of_the_txn_applies(cluster, kind):
    before = revision(cluster)
    with client(cluster, "alice", "alice-pw", **CLIENT_KINDS[kind]) as a:
        with pytest.raises(PermissionDenied, match=r"'other/x' \(txn success op 1\)"):
            a.txn(Txn().then(put("app/y", "1"), put("other/x", "1")))
        with pytest.raises(PermissionDenied, match=r"txn failure op 0"):
            a.txn(Txn().then(put("app/y", "1")).otherwise(get("other/secret")))
        assert a.get("app/y").kv is None
    assert revision(cluster) == before, "something of a refused txn was applied"
    with client(cluster, "root", "root-pw") as r:
        assert r.get("other/x").kv is None
    all_members_answer(cluster)


def test_root_may_do_everything_and_others_may_not_run_cluster_rpcs(cluster):
    with client(cluster, "root", "root-pw") as r:
        r.put("other/by-root", "1")
        assert r.alarms() == []
    with client(cluster, "alice", "alice-pw") as a:
        assert a.status().role in ("leader", "follower"), "Status stays open (health checks)"
        assert len(a.members()) == 3
        with pytest.raises(PermissionDenied, match="Alarm needs the root role"):
            a.alarms()
        with pytest.raises(PermissionDenied, match="TransferLeadership needs the root role"):
            a.transfer_leader()
        with pytest.raises(PermissionDenied, match="changing auth needs the root role"):
            a.role_add("mine")
        with pytest.raises(PermissionDenied, match="root role"):
            a.user_list()


def test_revoking_a_permission_takes_effect_on_every_member_at_once(cluster):
    with client(cluster, "root", "root-pw") as r:
        r.role_add("notes")
        r.role_grant_permission("notes", "readwrite", "notes/", prefix=True)
        r.user_add("bob", "bob-pw")
        r.user_grant_role("bob", "notes")
        r.put("notes/a", "1")
        bob = {ep: client(cluster, "bob", "bob-pw", endpoints=[ep]) for ep in cluster.endpoints}
        try:
            for ep, b in bob.items():  # every member serves bob, each with its own token
                assert b.get("notes/a", serializable=True).value == b"1", ep
                b.put("notes/b", ep)
            r.role_revoke_permission("notes", "notes/", prefix=True)
            # No waiting: each member, leader or not, refuses bob from the moment the revoke is acknowledged.
            # (A member that has not applied the revoke yet cannot serve him: his new token names the
            # auth revision of the revoke, and older members answer "retry".)
            before = revision(cluster)
            for b in bob.values():
                with pytest.raises(PermissionDenied, match="user 'bob' has no read permission"):
                    b.get("notes/a", serializable=True)
                with pytest.raises(PermissionDenied, match="user 'bob' has no write permission"):
                    b.put("notes/c", "1")
                with pytest.raises(PermissionDenied):
                    b.get("notes/a")
            assert revision(cluster) == before
        finally:
            for b in bob.values():
                b.close()
    all_members_answer(cluster)


def test_the_leaders_corruption_check_reaches_every_member_with_auth_on(cluster):
    """Its HashKV calls need root: the leader signs itself a short-lived root token."""
    leader = cluster.wait_for_leader(DEADLINE_S)
    with client(cluster, "root", "root-pw") as r:
        r.put("other/check", "1")

    def caught_up() -> bool:  # a member behind on auth changes answers "retry" for a while: not this test's point
        applied = {s.applied_index if s is not None else -1 for s in cluster.statuses(2.0).values()}
        return len(applied) == 1

    cluster.wait_for(caught_up, DEADLINE_S, "every member applied everything")
    with open(cluster.log_path(leader), "rb") as f:
        start = len(f.read())
    time.sleep(2.5)  # two checks at --corrupt-check-time 1s: nothing to poll for but the log
    with open(cluster.log_path(leader), "rb") as f:
        new = f.read()[start:].decode(errors="replace")
    assert "corruption check: member" not in new, new


def test_a_client_certificate_names_its_user_when_no_token_is_sent(cluster):
    """--client-cert-auth (the launcher's TLS clusters use it): the certificate's common name is the user."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(cluster.certs.client_cert, "rb") as f:
        cn = x509.load_pem_x509_certificate(f.read()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    with client(cluster) as anonymous:  # no user, no password: only the certificate
        with pytest.raises(Unauthenticated, match=f"the client certificate's name '{cn}' is not a user"):
            anonymous.put("certs/x", "1")
        with client(cluster, "root", "root-pw") as r:
            r.role_add("certs")
            r.role_grant_permission("certs", "readwrite", "certs/", prefix=True)
            r.user_add(cn, "unused-pw")
            r.user_grant_role(cn, "certs")
        anonymous.put("certs/x", "1")
        with pytest.raises(PermissionDenied, match=f"user '{cn}' has no write permission on 'app/x'"):
            anonymous.put("app/x", "1")
        with client(cluster, "root", "root-pw") as r:
            r.user_delete(cn)


def raw_stubs(lc: LocalCluster, i: int = 1):
    tls = lc.client_tls()
    channel = grpc.secure_channel(lc.client_addr(i), tls.credentials())
    return channel, kv_pb2_grpc.KVStub(channel), auth_pb2_grpc.AuthStub(channel)


def test_bad_credentials_and_tokens_are_unauthenticated_and_change_nothing(cluster):
    before = revision(cluster)
    for user, password in (("alice", "wrong"), ("nobody", "x")):
        with client(cluster, user, password) as c:
            with pytest.raises(Unauthenticated, match="invalid user name or password"):
                c.put("app/z", "1")
    with client(cluster) as anonymous:
        with pytest.raises(Unauthenticated, match="authenticate first"):
            anonymous.put("app/z", "1")
    leader = cluster.wait_for_leader(DEADLINE_S)
    channel, kv, auth = raw_stubs(cluster, leader)
    with channel:
        token = auth.Authenticate(auth_pb2.AuthenticateRequest(name="alice", password="alice-pw"), timeout=20).token
        req = kv_pb2.PutRequest(key=b"app/z", value=b"1")
        payload, sig = token.split(".")
        claims = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        as_root = base64.urlsafe_b64encode(claims.replace(b":alice", b":root")).rstrip(b"=").decode()
        newer = base64.urlsafe_b64encode(b"999999" + claims[claims.index(b":"):]).rstrip(b"=").decode()
        cases = {f"{as_root}.{sig}": "bad signature", f"{newer}.{sig}": "bad signature",
                 "garbage": "malformed token", payload + ".": "bad signature"}
        for bad, why in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                kv.Put(req, metadata=(("token", bad),), timeout=20)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED and why in info.value.details()
        time.sleep(TOKEN_TTL_S + 0.5)  # the token's own lifetime: nothing to poll for
        with pytest.raises(grpc.RpcError) as info:
            kv.Put(req, metadata=(("token", token),), timeout=20)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED and "token expired" in info.value.details()
    with client(cluster, "alice", "alice-pw") as a:  # a client renews an expired token by itself
        a.put("app/renewed", "1")
        time.sleep(TOKEN_TTL_S + 0.5)
        a.put("app/renewed", "2")
    assert revision(cluster) == before + 2
    all_members_answer(cluster)


def test_every_kv_call_without_a_token_is_unauthenticated_and_every_one_is_checked(cluster):
    leader = cluster.wait_for_leader(DEADLINE_S)
    before = revision(cluster)
    calls = {
        "Range": kv_pb2.RangeRequest(key=b"app/x"),
        "Put": kv_pb2.PutRequest(key=b"app/x", value=b"1"),
        "DeleteRange": kv_pb2.DeleteRangeRequest(key=b"app/x"),
        "Txn": kv_pb2.TxnRequest(success=[kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"app/x"))]),
        "Batch": kv_pb2.BatchRequest(ops=[kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=b"app/x"))]),
    }
    channel, kv, auth = raw_stubs(cluster, leader)
    with channel:
        token = auth.Authenticate(auth_pb2.AuthenticateRequest(name="alice", password="alice-pw"), timeout=20).token
        for name, req in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                getattr(kv, name)(req, timeout=20)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, name
        session = kv.Session(iter([kv_pb2.SessionRequest(id=1, put=calls["Put"])]), timeout=20)
        answer = next(iter(session)).answers[0]
        assert answer.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0] and answer.error.not_applied
        with pytest.raises(grpc.RpcError) as info:  # outside alice's prefix, by a call the client never makes alone
            kv.DeleteRange(kv_pb2.DeleteRangeRequest(key=b"app/", range_end=b"\0"), metadata=(("token", token),),
                           timeout=20)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "no write permission on every key from 'app/'" in info.value.details()
    assert revision(cluster) == before


def test_a_watch_needs_read_permission_on_what_it_covers_and_compaction_needs_root(cluster):
    import asyncio

    from kvstore.client import AsyncClient
    from kvstore.client.watch import WatchCanceled

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, tls=cluster.client_tls(), timeout=30, user="alice",
                               password="alice-pw") as a:
            events = a.watch("app/w", prefix=True)
            first = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(0.5)  # the watch is created before the put (no event to poll for yet)
            await a.put("app/w1", "1")
            ev = await asyncio.wait_for(first, 30)
            assert ev.kv.key == b"app/w1"
            with pytest.raises(WatchCanceled, match="permission denied: user 'alice' may not read"):
                await asyncio.wait_for(a.watch("other/", prefix=True).__anext__(), 30)
            with pytest.raises(PermissionDenied, match="Compact needs the root role"):
                await a.compact(1)

    asyncio.run(main())


def test_a_password_change_ends_every_token_issued_before_it_on_every_member(cluster):
    """Tokens carry the auth revision: after any auth change, older tokens are refused everywhere."""
    leader = cluster.wait_for_leader(DEADLINE_S)
    channel, _, auth = raw_stubs(cluster, leader)
    with channel:
        req = auth_pb2.AuthenticateRequest(name="mallory", password="mallory-pw")
        token = auth.Authenticate(req, timeout=20).token
    with client(cluster, "root", "root-pw") as r:
        r.user_change_password("mallory", "mallory-pw2")
        r.get("probe")  # a linearizable read: the change is applied on the leader; followers follow
    for i in cluster.ids:
        channel, kv, _ = raw_stubs(cluster, i)
        with channel:
            def refused(kv=kv) -> bool:
                try:
                    kv.Range(kv_pb2.RangeRequest(key=b"x", serializable=True), metadata=(("token", token),),
                             timeout=20)
                except grpc.RpcError as e:
                    if e.code() is grpc.StatusCode.UNAUTHENTICATED:
                        # refused for its auth revision, not for its age (TOKEN_TTL_S is short here)
                        assert "is from auth revision" in e.details(), e.details()
                        return True
                return False  # served (or not yet applied there): a member may lag by a few ms

            cluster.wait_for(refused, DEADLINE_S, f"member {i} refusing the old token")
    with client(cluster, "mallory", "mallory-pw") as old:
        with pytest.raises(Unauthenticated, match="invalid user name or password"):
            old.get("x", serializable=True)
    with client(cluster, "mallory", "mallory-pw2") as new:
        with pytest.raises(PermissionDenied):  # authenticated; mallory holds no role
            new.get("x")


def test_the_cli_manages_users_roles_and_permissions(cluster):
    c = cluster.certs
    base = ["--endpoints", ",".join(cluster.endpoints), "--cacert", c.ca_cert, "--cert", c.client_cert,
            "--key", c.client_key, "--timeout", "30"]
    runner = CliRunner()  # stderr apart from stdout (click 8.2)

    def kvstore(*args: str, user: str = "root:root-pw", input: str | None = None, ok: bool = True):
        result = runner.invoke(cli_main, [*base, "--user", user, *args], input=input)
        assert (result.exit_code == 0) is ok, (args, result.stdout, result.stderr)
        return result

    assert "Role cli created" in kvstore("role", "add", "cli").stdout
    kvstore("role", "grant-permission", "--prefix", "cli", "readwrite", "cli/")
    kvstore("role", "grant-permission", "cli", "read", "shared/a", "shared/m")
    kvstore("user", "add", "carol", input="carol-pw\ncarol-pw\n")  # asked for, twice
    kvstore("user", "grant-role", "carol", "cli")
    assert kvstore("user", "get", "carol").stdout.split() == ["User:", "carol", "Roles:", "cli"]
    assert "carol" in kvstore("user", "list").stdout.split()
    got = kvstore("role", "get", "cli").stdout
    assert "[cli/, cli0) (prefix cli/)" in got and "[shared/a, shared/m)\n" in got
    assert "Authentication Status: true" in kvstore("auth", "status").stdout
    kvstore("put", "cli/x", "1", user="carol", input="carol-pw\n")  # --user without the password: asked
    denied = kvstore("put", "other", "1", user="carol:carol-pw", ok=False)
    assert "PermissionDenied: permission denied: user 'carol' has no write permission on 'other'" in denied.stderr
    wrong = kvstore("get", "cli/x", user="carol:nope", ok=False)
    assert "Unauthenticated: authentication failed: invalid user name or password" in wrong.stderr
    kvstore("role", "revoke-permission", "--prefix", "cli", "cli/")
    assert "PermissionDenied" in kvstore("get", "cli/x", user="carol:carol-pw", ok=False).stderr
    assert "Traceback" not in denied.stderr + wrong.stderr


def test_failed_authentications_are_limited_per_user_and_per_address(cluster):
    """Last on this cluster: it leaves 127.0.0.1 blocked for the limiter's window."""
    leader = cluster.wait_for_leader(DEADLINE_S)
    channel, _, auth = raw_stubs(cluster, leader)

    def authenticate(name: str, password: str) -> str:
        with pytest.raises(grpc.RpcError) as info:
            auth.Authenticate(auth_pb2.AuthenticateRequest(name=name, password=password), timeout=20)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        return info.value.details()

    with channel:
        details = [authenticate("mallory", "guess") for _ in range(6)]
        assert details[0] == "authentication failed: invalid user name or password"
        assert details[-1].startswith("too many failed authentications for user 'mallory' (5 in 10 s)")
        assert "too many" in authenticate("mallory", "mallory-pw"), "the right password too, within the window"
        # 20 failures per address within 10 s: a slow machine may need a few more tries to get there.
        details = []
        for i in range(40):
            details.append(authenticate(f"guess{i}", "guess"))
            if "too many" in details[-1]:
                break
        assert "too many failed authentications for address ipv4:127.0.0.1 (20 in 10 s)" in details[-1], details
        assert len(details) >= 15, "the address limit came early"
    log = cluster.log_tail(leader, 400)
    assert "authentication failed for user 'mallory' from ipv4:127.0.0.1 (wrong password)" in log
    assert "authentication failed for user 'guess0' from ipv4:127.0.0.1 (unknown user)" in log


@pytest.fixture(scope="module")
def cluster_without_txn_check(tmp_path_factory):
    lc = LocalCluster.with_free_ports(str(tmp_path_factory.mktemp("auth-no-txn-check")),
                                      extra_args=["--testing-auth-skip-txn-check"])
    lc.start()
    try:
        lc.wait_for_leader(DEADLINE_S)
        set_up_auth(lc, None)
        yield lc
    finally:
        lc.stop()


def test_teeth_without_the_txn_check_the_hidden_write_lands(cluster_without_txn_check):
    """What the txn test above guards against: with the per-op check inside txns skipped, it would fail."""
    with Client(cluster_without_txn_check.endpoints, timeout=30, user="alice", password="alice-pw") as a:
        a.txn(Txn().then(put("app/y", "1"), put("other/x", "leaked")))
        assert a.get("app/y").value == b"1"
    with Client(cluster_without_txn_check.endpoints, timeout=30, user="root", password="root-pw") as r:
        assert r.get("other/x").value == b"leaked"
