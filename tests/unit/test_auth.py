"""Auth without a cluster: permissions, tokens, passwords, the failure limiter, and the replicated auth state."""
from __future__ import annotations

import os

import pytest

from kvstore.server import passwords, tokens
from kvstore.server.auth_limiter import FailureLimiter
from kvstore.storage import permissions
from kvstore.storage.errors import ApplyError, ErrorCode
from kvstore.storage.permissions import READ, WRITE, Denied, UserPermissions
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import auth_pb2, command_pb2, kv_pb2

P = auth_pb2.Permission


def perm(kind, key, end=b""):
    return P(perm_type=kind, key=key, range_end=end)


def put(k, v=b"v"):
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v))


def rng(k, end=b""):
    return kv_pb2.RequestOp(request_range=kv_pb2.RangeRequest(key=k, range_end=end))


def txn(success=(), failure=(), compare=()):
    return kv_pb2.RequestOp(request_txn=kv_pb2.TxnRequest(compare=compare, success=success, failure=failure))


# ---- permissions -----------------------------------------------------------------


def test_a_prefix_permission_covers_its_keys_and_ranges_inside_it_only():
    p = UserPermissions("alice", False, [perm(P.READWRITE, b"app/", b"app0")])
    assert p.allows(WRITE, b"app/x") and p.allows(READ, b"app/x")
    assert p.allows(READ, b"app/", b"app0") and p.allows(READ, b"app/a", b"app/b")
    assert not p.allows(WRITE, b"other/x")
    assert not p.allows(WRITE, b"app0")
    assert not p.allows(READ, b"app/", b"\0"), "a read of every key from app/ reaches beyond the prefix"
    assert not p.allows(READ, b"a", b"app/z"), "a range starting before the prefix"


def test_read_and_write_are_separate_and_touching_grants_join():
    p = UserPermissions("bob", False, [perm(P.READ, b"a", b"m"), perm(P.READ, b"m", b"z"), perm(P.WRITE, b"k")])
    assert p.allows(READ, b"b", b"y"), "[a, m) and [m, z) together cover [b, y)"
    assert not p.allows(WRITE, b"b")
    assert p.allows(WRITE, b"k") and not p.allows(WRITE, b"k", b"l") and not p.allows(READ, b"k0", b"zz")


def test_every_key_from_and_root():
    p = UserPermissions("c", False, [perm(P.WRITE, b"m", b"\0")])
    assert p.allows(WRITE, b"zzz") and p.allows(WRITE, b"m", b"\0") and not p.allows(WRITE, b"a")
    assert UserPermissions("root", True, []).allows(WRITE, b"anything", b"\0")


def test_a_txn_is_checked_op_by_op_in_both_branches_and_its_compares():
    p = UserPermissions("alice", False, [perm(P.READWRITE, b"app/", b"app0")])
    p.check_op(txn(success=[put(b"app/y")], failure=[rng(b"app/z")]))
    with pytest.raises(Denied, match=r"no write permission on 'other/x' \(txn success op 1\)"):
        p.check_op(txn(success=[put(b"app/y"), put(b"other/x")]))
    with pytest.raises(Denied, match=r"txn failure op 0"):
        p.check_op(txn(failure=[put(b"other/x")]))
    with pytest.raises(Denied, match=r"no read permission on 'secret' \(txn compare 0\)"):
        p.check_op(txn(compare=[kv_pb2.Compare(key=b"secret")]))
    with pytest.raises(Denied, match=r"txn success op 0 \(txn success op 0\)"):
        p.check_op(txn(success=[txn(success=[put(b"other/x")])]))


def test_the_testing_switch_skips_the_ops_inside_a_txn(monkeypatch):
    p = UserPermissions("alice", False, [perm(P.READWRITE, b"app/", b"app0")])
    monkeypatch.setattr(permissions, "testing_skip_txn_ops", True)
    p.check_op(txn(success=[put(b"other/x")]))  # the hole the integration test's teeth look for


# ---- tokens and passwords --------------------------------------------------------


def test_a_token_verifies_with_its_key_only_and_tampering_shows():
    key = os.urandom(32)
    tok = tokens.issue(key, "alice", 7, 123)
    claims, payload, sig = tokens.parse(tok)
    assert claims == tokens.Token("alice", 7, 123)
    assert tokens.verify(key, payload, sig)
    assert not tokens.verify(os.urandom(32), payload, sig)
    forged = tokens.issue(os.urandom(32), "root", 7, 10**15).split(".")[0] + "." + tok.split(".")[1]
    _, payload, sig = tokens.parse(forged)
    assert not tokens.verify(key, payload, sig)
    with pytest.raises(tokens.TokenError):
        tokens.parse("not-a-token")


def test_passwords_are_salted_scrypt_and_checked():
    h = passwords.hash_password("s3cret")
    assert h.startswith(b"scrypt$") and b"s3cret" not in h
    assert h != passwords.hash_password("s3cret"), "salted"
    assert passwords.verify_password("s3cret", h)
    assert not passwords.verify_password("s3cret!", h)
    assert not passwords.verify_password("s3cret", b"garbage")


def test_failures_are_limited_per_user_and_per_address():
    now = [0.0]
    lim = FailureLimiter(max_user_failures=3, max_addr_failures=4, window_s=10, clock=lambda: now[0])
    for _ in range(3):
        assert lim.blocked("alice", "ipv4:10.0.0.1") is None
        lim.failed("alice", "ipv4:10.0.0.1")
    assert lim.blocked("alice", "ipv4:10.0.0.9")[0] == "user 'alice' (3 in 10 s)"
    assert lim.blocked("bob", "ipv4:10.0.0.1") is None, "the address has one failure left"
    lim.failed("carol", "ipv4:10.0.0.1")
    assert lim.blocked("bob", "ipv4:10.0.0.1")[0] == "address ipv4:10.0.0.1 (4 in 10 s)"
    assert lim.blocked("bob", "ipv4:10.0.0.9") is None
    now[0] = 10.5
    assert lim.blocked("alice", "ipv4:10.0.0.1") is None, "the window passed"


# ---- the replicated auth state -----------------------------------------------------


class Log:
    def __init__(self, sm: StateMachine) -> None:
        self.sm, self.index = sm, sm.applied_index

    def __call__(self, cmd: command_pb2.Command):
        self.index += 1
        return self.sm.apply([(self.index, 2, cmd.SerializeToString())])[0]


def change(user: str = "", **kw) -> command_pb2.Command:
    return command_pb2.Command(auth=auth_pb2.AuthRequest(**kw), auth_user=user, leader_clock_ms=1)


def ops(user: str, *op: kv_pb2.RequestOp) -> command_pb2.Command:
    return command_pb2.Command(ops=op, auth_user=user, leader_clock_ms=1)


def setup_app(log: Log) -> None:
    hashed = passwords.hash_password("pw")
    for req in (dict(user_add=auth_pb2.UserAddRequest(name="root", hashed_password=hashed)),
                dict(role_add=auth_pb2.RoleAddRequest(name="app")),
                dict(role_grant_permission=auth_pb2.RoleGrantPermissionRequest(
                    name="app", perm=perm(P.READWRITE, b"app/", b"app0"))),
                dict(user_add=auth_pb2.UserAddRequest(name="alice", hashed_password=hashed)),
                dict(user_grant_role=auth_pb2.UserGrantRoleRequest(user="alice", role="app"))):
        assert not isinstance(log(change(**req)), ApplyError)


@pytest.fixture
def sm(tmp_path):
    m = StateMachine.open(str(tmp_path / "sm"), 1 << 26, fsync=False)
    yield m
    m.close()


def test_enable_is_refused_until_root_exists_then_commands_need_a_permitted_user(sm):
    log = Log(sm)
    err = log(change(enable=auth_pb2.AuthEnableRequest(token_key=os.urandom(32))))
    assert isinstance(err, ApplyError) and err.code is ErrorCode.FAILED_PRECONDITION and "root" in err.message
    setup_app(log)
    assert not isinstance(log(change(enable=auth_pb2.AuthEnableRequest(token_key=os.urandom(32)))), ApplyError)
    assert sm.auth.enabled and sm.auth.revision == 6
    rev = sm.revision
    assert not isinstance(log(ops("alice", put(b"app/x"))), ApplyError)
    assert sm.revision == rev + 1
    denied = log(ops("alice", put(b"app/y"), put(b"other/x")))
    assert isinstance(denied, ApplyError) and denied.code is ErrorCode.PERMISSION_DENIED
    assert "'other/x'" in denied.message
    nobody = log(ops("", put(b"app/z")))
    assert isinstance(nobody, ApplyError) and nobody.code is ErrorCode.UNAUTHENTICATED
    assert sm.revision == rev + 1 and sm.get(b"app/y") is None, "nothing of a refused command applied"


def test_a_permission_revoked_before_the_apply_holds_and_only_root_changes_auth(sm):
    log = Log(sm)
    setup_app(log)
    log(change(enable=auth_pb2.AuthEnableRequest(token_key=os.urandom(32))))
    refused = log(change("alice", role_add=auth_pb2.RoleAddRequest(name="mine")))
    assert isinstance(refused, ApplyError) and refused.code is ErrorCode.PERMISSION_DENIED
    checked_at = sm.auth.revision
    log(change("root", role_revoke_permission=auth_pb2.RoleRevokePermissionRequest(
        role="app", key=b"app/", range_end=b"app0")))
    late = ops("alice", put(b"app/x"))
    late.auth_revision = checked_at  # checked by the member that proposed it, before the revoke
    late = log(late)
    assert isinstance(late, ApplyError) and late.code is ErrorCode.PERMISSION_DENIED
    gone = log(change("root", user_delete=auth_pb2.UserDeleteRequest(name="root")))
    assert isinstance(gone, ApplyError) and "cannot be deleted" in gone.message


def test_the_auth_state_survives_a_reopen(tmp_path):
    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 1 << 26, fsync=False)
    setup_app(Log(sm))
    sm.close()
    sm = StateMachine.open(path, 1 << 26, fsync=False)
    try:
        assert sorted(sm.auth.users) == ["alice", "root"] and sm.auth.revision == 5
        assert sm.auth.permissions("alice").allows(WRITE, b"app/q")
        assert sm.auth.is_root("root") and not sm.auth.is_root("alice")
    finally:
        sm.close()


def test_a_command_checked_at_the_current_auth_revision_is_not_checked_again(sm):
    log = Log(sm)
    setup_app(log)
    log(change(enable=auth_pb2.AuthEnableRequest(token_key=os.urandom(32))))
    current = ops("alice", put(b"app/x"))
    current.auth_revision = sm.auth.revision
    assert not isinstance(log(current), ApplyError)
    older = ops("alice", put(b"other/x"))
    older.auth_revision = sm.auth.revision - 1
    refused = log(older)
    assert isinstance(refused, ApplyError) and refused.code is ErrorCode.PERMISSION_DENIED


def test_a_snapshot_carries_the_auth_state(tmp_path, sm):
    from kvstore.storage.snapshot import SnapshotStore

    log = Log(sm)
    setup_app(log)
    log(change(enable=auth_pb2.AuthEnableRequest(token_key=os.urandom(32))))
    _, _, path = SnapshotStore(str(tmp_path / "snaps")).create(sm, [1, 2, 3])
    follower = StateMachine.open(str(tmp_path / "follower"), 1 << 26, fsync=False)
    try:
        assert not follower.auth.enabled
        follower.install_snapshot(path)
        assert follower.auth.enabled and follower.auth.revision == sm.auth.revision
        assert follower.auth.token_key == sm.auth.token_key, "tokens of either are good on both"
        assert follower.auth.permissions("alice").allows(WRITE, b"app/x")
    finally:
        follower.close()


def test_bad_auth_changes_are_refused_naming_the_problem_and_change_nothing(sm):
    log = Log(sm)
    setup_app(log)
    before = sm.auth.revision
    bad = {
        "user name is empty": dict(user_add=auth_pb2.UserAddRequest(name="", hashed_password=b"h")),
        "longer than 128 bytes": dict(role_add=auth_pb2.RoleAddRequest(name="r" * 129)),
        "already exists": dict(user_add=auth_pb2.UserAddRequest(name="alice", hashed_password=b"h")),
        "role 'nope' not found": dict(user_grant_role=auth_pb2.UserGrantRoleRequest(user="alice", role="nope")),
        "at most 511 bytes": dict(role_grant_permission=auth_pb2.RoleGrantPermissionRequest(
            name="app", perm=perm(P.READ, b"k" * 600))),
        "unknown permission type 7": dict(role_grant_permission=auth_pb2.RoleGrantPermissionRequest(
            name="app", perm=perm(7, b"k"))),
        "root role is built in": dict(role_delete=auth_pb2.RoleDeleteRequest(role="root")),
        "has no permission on": dict(role_revoke_permission=auth_pb2.RoleRevokePermissionRequest(
            role="app", key=b"zzz")),
    }
    for why, req in bad.items():
        err = log(change(**req))
        assert isinstance(err, ApplyError) and why in err.message, (why, err)
    assert sm.auth.revision == before


def test_a_refusal_of_a_session_write_is_its_answer_a_retry_gets_it_again(sm):
    """Client writes carry a session (client id, seq): their refusal is recorded like any answer."""
    log = Log(sm)
    setup_app(log)
    log(change(enable=auth_pb2.AuthEnableRequest(token_key=os.urandom(32))))
    write = ops("alice", put(b"other/x"))
    write.request_id.CopyFrom(kv_pb2.RequestId(client_id=7, seq=1, opens_session=True))
    write.auth_revision = sm.auth.revision - 1  # checked before a change: checked again here
    first = log(write)
    assert isinstance(first, ApplyError) and first.code is ErrorCode.PERMISSION_DENIED
    log(change("root", role_grant_permission=auth_pb2.RoleGrantPermissionRequest(
        name="app", perm=perm(P.WRITE, b"other/x"))))
    assert log(write) == first, "a retry is answered as the first attempt was, not applied now"
    assert sm.get(b"other/x") is None
