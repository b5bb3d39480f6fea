"""The replicated auth state: users, roles, permissions, and whether auth is enabled.

Auth changes travel through the log as `Command.auth` (an `AuthRequest`) and
are applied here, in the state machine's write transaction, to one record of
the "auth" sub-database (an `AuthState`; auth state is small and changes
rarely, so one record keeps every change atomic and a snapshot carries it).
Every applied change adds one to the auth revision. Like the alarm list, a
change is staged during the apply and published once the transaction commits,
so readers on other threads see either the old state or the new one.

Rules (etcd's): the `root` role is built in and allows everything; the user
`root` holds it from its creation; `auth enable` is refused until that user
exists; while auth is enabled only a root user may change auth, the root user
cannot be deleted nor lose the root role. Client commands are checked against
their user's permissions when applied (`refusal`), so a permission revoked
while a write was in flight is obeyed by every member alike; a command applied
at the auth revision its proposer checked it at is not checked again (the same
state gives the same verdict, and the check costs about a microsecond per op
on every member).
"""
from __future__ import annotations

from collections.abc import Callable

import lmdb

from kvstore.v1 import auth_pb2, command_pb2

from .errors import ApplyError, ErrorCode
from .keys import MAX_KEY_BYTES
from .permissions import ROOT_ROLE, ROOT_USER, Denied, UserPermissions

__all__ = ["AuthState", "AuthStore", "MAX_NAME_BYTES", "TOKEN_KEY_BYTES"]

_STATE_KEY = b"state"
MAX_NAME_BYTES = 128
TOKEN_KEY_BYTES = 32


class AuthState:
    """The auth state at one auth revision (never changed in place: a change makes a new one)."""

    __slots__ = ("enabled", "revision", "token_key", "users", "roles", "_perms")

    def __init__(self, pb: auth_pb2.AuthState) -> None:
        self.enabled = pb.enabled
        self.revision = pb.revision
        self.token_key = bytes(pb.token_key)
        self.users: dict[str, auth_pb2.AuthUser] = {u.name: u for u in pb.users}
        self.roles: dict[str, auth_pb2.AuthRole] = {r.name: r for r in pb.roles}
        self._perms: dict[str, UserPermissions] = {}

    def to_proto(self) -> auth_pb2.AuthState:
        return auth_pb2.AuthState(
            enabled=self.enabled, revision=self.revision, token_key=self.token_key,
            users=[self.users[n] for n in sorted(self.users)], roles=[self.roles[n] for n in sorted(self.roles)],
        )

    def is_root(self, user: str) -> bool:
        u = self.users.get(user)
        return u is not None and ROOT_ROLE in u.roles

    def permissions(self, user: str) -> UserPermissions | None:
        """What ``user`` may do (None: no such user); computed once per user and revision."""
        p = self._perms.get(user)
        if p is None:
            u = self.users.get(user)
            if u is None:
                return None
            perms = [perm for r in u.roles if r in self.roles for perm in self.roles[r].perms]
            p = self._perms[user] = UserPermissions(user, ROOT_ROLE in u.roles, perms, self.revision)
        return p


def _precondition(message: str) -> ApplyError:
    return ApplyError(ErrorCode.FAILED_PRECONDITION, message)


class AuthStore:
    """The auth sub-database of one state machine environment."""

    def __init__(self, db: lmdb._Database, txn: lmdb.Transaction) -> None:
        self._db = db
        raw = txn.get(_STATE_KEY, db=db)
        self.state = AuthState(auth_pb2.AuthState.FromString(bytes(raw)) if raw else auth_pb2.AuthState())
        self._staged: AuthState | None = None

    @property
    def current(self) -> AuthState:
        """The state as of the last applied command (staged within an apply batch)."""
        return self.state if self._staged is None else self._staged

    def publish(self) -> None:
        """The apply transaction committed: its changes are now the state readers see."""
        if self._staged is not None:
            self.state, self._staged = self._staged, None

    def discard(self) -> None:
        self._staged = None

    # ---- client commands ---------------------------------------------------

    def refusal(self, cmd: command_pb2.Command) -> ApplyError | None:
        """Why the command's user may not run its ops, or None (also None while auth is disabled)."""
        st = self.current
        if not st.enabled:
            return None
        user = cmd.auth_user
        if not user:
            return ApplyError(ErrorCode.UNAUTHENTICATED, "auth is enabled: the request carries no user")
        if cmd.auth_revision == st.revision:
            return None  # checked by the proposing member against this very state: the same verdict
        perms = st.permissions(user)
        if perms is None:
            return ApplyError(ErrorCode.UNAUTHENTICATED, f"user {user!r} does not exist")
        try:
            for op in cmd.ops:
                perms.check_op(op)
        except Denied as e:
            return ApplyError(ErrorCode.PERMISSION_DENIED, str(e))
        return None

    # ---- auth changes ------------------------------------------------------

    def apply(self, txn: lmdb.Transaction, cmd: command_pb2.Command) -> AuthState | ApplyError:
        """Apply one auth change (deterministic on every member): the new state, or why not."""
        st = self.current
        req = cmd.auth
        if st.enabled and not st.is_root(cmd.auth_user):
            who = repr(cmd.auth_user) if cmd.auth_user else "an unauthenticated client"
            return ApplyError(ErrorCode.PERMISSION_DENIED,
                              f"permission denied: only a user with the root role may change auth, not {who}")
        kind = req.WhichOneof("request")
        handler = _CHANGES.get(kind or "")
        if handler is None:
            return ApplyError(ErrorCode.INVALID_ARGUMENT, "empty auth request")
        pb = st.to_proto()
        err = handler(pb, getattr(req, kind))
        if err is not None:
            return err
        pb.revision = st.revision + 1
        new = AuthState(pb)
        txn.put(_STATE_KEY, new.to_proto().SerializeToString(), db=self._db)
        self._staged = new
        return new


def _names(pb: auth_pb2.AuthState) -> tuple[dict[str, auth_pb2.AuthUser], dict[str, auth_pb2.AuthRole]]:
    return {u.name: u for u in pb.users}, {r.name: r for r in pb.roles}


def _check_name(what: str, name: str) -> ApplyError | None:
    if not name:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, f"{what} name is empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, f"{what} name is longer than {MAX_NAME_BYTES} bytes")
    return None


def _role_exists(roles: dict[str, auth_pb2.AuthRole], role: str) -> bool:
    return role == ROOT_ROLE or role in roles


def _enable(pb: auth_pb2.AuthState, req: auth_pb2.AuthEnableRequest) -> ApplyError | None:
    users, _ = _names(pb)
    root = users.get(ROOT_USER)
    if root is None or ROOT_ROLE not in root.roles:
        return _precondition("auth enable refused: the root user does not exist (add it first: user add root)")
    if len(req.token_key) != TOKEN_KEY_BYTES:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, f"token key must be {TOKEN_KEY_BYTES} bytes")
    pb.enabled = True
    pb.token_key = req.token_key
    return None


def _disable(pb: auth_pb2.AuthState, req: auth_pb2.AuthDisableRequest) -> ApplyError | None:
    pb.enabled = False
    return None


def _user_add(pb: auth_pb2.AuthState, req: auth_pb2.UserAddRequest) -> ApplyError | None:
    err = _check_name("user", req.name)
    if err is not None:
        return err
    users, _ = _names(pb)
    if req.name in users:
        return _precondition(f"user {req.name!r} already exists")
    if not req.hashed_password:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, "a user needs a password")
    roles = [ROOT_ROLE] if req.name == ROOT_USER else []
    pb.users.append(auth_pb2.AuthUser(name=req.name, hashed_password=req.hashed_password, roles=roles))
    return None


def _user(pb: auth_pb2.AuthState, name: str) -> auth_pb2.AuthUser | ApplyError:
    for u in pb.users:
        if u.name == name:
            return u
    return _precondition(f"user {name!r} not found")


def _user_delete(pb: auth_pb2.AuthState, req: auth_pb2.UserDeleteRequest) -> ApplyError | None:
    u = _user(pb, req.name)
    if isinstance(u, ApplyError):
        return u
    if pb.enabled and req.name == ROOT_USER:
        return _precondition("the root user cannot be deleted while auth is enabled")
    pb.users.remove(u)
    return None


def _user_change_password(pb: auth_pb2.AuthState, req: auth_pb2.UserChangePasswordRequest) -> ApplyError | None:
    u = _user(pb, req.name)
    if isinstance(u, ApplyError):
        return u
    if not req.hashed_password:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, "a user needs a password")
    u.hashed_password = req.hashed_password
    return None


def _user_grant_role(pb: auth_pb2.AuthState, req: auth_pb2.UserGrantRoleRequest) -> ApplyError | None:
    u = _user(pb, req.user)
    if isinstance(u, ApplyError):
        return u
    _, roles = _names(pb)
    if not _role_exists(roles, req.role):
        return _precondition(f"role {req.role!r} not found")
    if req.role not in u.roles:
        new = sorted([*u.roles, req.role])
        del u.roles[:]
        u.roles.extend(new)
    return None


def _user_revoke_role(pb: auth_pb2.AuthState, req: auth_pb2.UserRevokeRoleRequest) -> ApplyError | None:
    u = _user(pb, req.name)
    if isinstance(u, ApplyError):
        return u
    if req.role not in u.roles:
        return _precondition(f"user {req.name!r} does not hold role {req.role!r}")
    if pb.enabled and req.name == ROOT_USER and req.role == ROOT_ROLE:
        return _precondition("the root user cannot lose the root role while auth is enabled")
    u.roles.remove(req.role)
    return None


def _role_add(pb: auth_pb2.AuthState, req: auth_pb2.RoleAddRequest) -> ApplyError | None:
    err = _check_name("role", req.name)
    if err is not None:
        return err
    _, roles = _names(pb)
    if _role_exists(roles, req.name):
        return _precondition(f"role {req.name!r} already exists")
    pb.roles.append(auth_pb2.AuthRole(name=req.name))
    return None


def _role(pb: auth_pb2.AuthState, name: str) -> auth_pb2.AuthRole | ApplyError:
    if name == ROOT_ROLE:
        return _precondition("the root role is built in: it allows everything and cannot be changed")
    for r in pb.roles:
        if r.name == name:
            return r
    return _precondition(f"role {name!r} not found")


def _role_delete(pb: auth_pb2.AuthState, req: auth_pb2.RoleDeleteRequest) -> ApplyError | None:
    r = _role(pb, req.role)
    if isinstance(r, ApplyError):
        return r
    pb.roles.remove(r)
    for u in pb.users:
        if req.role in u.roles:
            u.roles.remove(req.role)
    return None


def _role_grant_permission(pb: auth_pb2.AuthState, req: auth_pb2.RoleGrantPermissionRequest) -> ApplyError | None:
    r = _role(pb, req.name)
    if isinstance(r, ApplyError):
        return r
    perm = req.perm
    if not perm.key:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, "a permission needs a key")
    if len(perm.key) > MAX_KEY_BYTES or len(perm.range_end) > MAX_KEY_BYTES:
        return ApplyError(ErrorCode.INVALID_ARGUMENT, f"a permission's key and range end are at most "
                                                      f"{MAX_KEY_BYTES} bytes (the key limit)")
    if perm.perm_type not in auth_pb2.Permission.Type.values():
        return ApplyError(ErrorCode.INVALID_ARGUMENT, f"unknown permission type {perm.perm_type} "
                                                      "(READ=0, WRITE=1, READWRITE=2)")
    for p in r.perms:
        if p.key == req.perm.key and p.range_end == req.perm.range_end:
            p.perm_type = req.perm.perm_type  # the same key or range again: the new type replaces the old
            return None
    r.perms.append(req.perm)
    return None


def _role_revoke_permission(pb: auth_pb2.AuthState, req: auth_pb2.RoleRevokePermissionRequest) -> ApplyError | None:
    r = _role(pb, req.role)
    if isinstance(r, ApplyError):
        return r
    for p in r.perms:
        if p.key == req.key and p.range_end == req.range_end:
            r.perms.remove(p)
            return None
    return _precondition(f"role {req.role!r} has no permission on that key or range")


_CHANGES: dict[str, Callable[..., ApplyError | None]] = {
    "enable": _enable,
    "disable": _disable,
    "user_add": _user_add,
    "user_delete": _user_delete,
    "user_change_password": _user_change_password,
    "user_grant_role": _user_grant_role,
    "user_revoke_role": _user_revoke_role,
    "role_add": _role_add,
    "role_delete": _role_delete,
    "role_grant_permission": _role_grant_permission,
    "role_revoke_permission": _role_revoke_permission,
}
