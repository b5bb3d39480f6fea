"""Who is calling, and may they: tokens checked, permissions checked, Cluster/Maintenance kept to root.

Every client call carries its token as the metadata ``token`` (a session
stream: once, when it is opened; each request on it is still checked). With
--client-cert-auth, a call without a token is the user its client
certificate's common name names, if there is such a user (etcd's rule). While
the replicated auth state says auth is disabled, every call passes. Once it is
enabled:

- no token, a malformed or tampered one, an expired one, or one issued at an
  older auth revision than this member's: UNAUTHENTICATED (the client library
  authenticates again and retries: every auth change thus takes effect on
  every client at once);
- a token issued at a newer auth revision than this member has applied:
  UNAVAILABLE (retried), so that no member judges a request by permissions
  older than those its token was issued under;
- an op the user's roles do not allow: PERMISSION_DENIED naming the user, the
  access and the key or range (inside a txn, which op);
- Cluster and Maintenance RPCs other than Status and MemberList (which every
  client uses to find members) need the root role.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc

from kvstore.storage.permissions import ROOT_USER, Denied, UserPermissions
from kvstore.v1 import kv_pb2

from . import tokens
from .errors import RequestFailed

if TYPE_CHECKING:  # node.py imports corruption.py, which imports this
    from .node import Node

__all__ = ["AuthGuard", "TOKEN_METADATA_KEY", "root_only", "unauthenticated", "permission_denied"]

log = logging.getLogger("kvstore.auth")

TOKEN_METADATA_KEY = "token"
_CACHE_MAX = 10_000


def unauthenticated(message: str) -> RequestFailed:
    return RequestFailed(grpc.StatusCode.UNAUTHENTICATED, message, not_applied=True)


def permission_denied(message: str) -> RequestFailed:
    return RequestFailed(grpc.StatusCode.PERMISSION_DENIED, message, not_applied=True)


def token_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for k, v in metadata or ():
        if k == TOKEN_METADATA_KEY:
            return v.decode() if isinstance(v, bytes) else v
    return ""


class AuthGuard:
    """The auth checks of one member, against its state machine's auth state."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # token -> (its claims, the key it verified under): a token is verified once, not per call
        self._verified: dict[str, tuple[tokens.Token, bytes]] = {}

    def user(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's user name, or None while auth is disabled; RequestFailed if it may not call at all."""
        if not self.node.sm.auth.enabled:
            return None
        return self.user_of(*self.credentials(context))

    def credentials(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """(the call's token, its client certificate's common name when --client-cert-auth checked it)."""
        token = token_of(context.invocation_metadata())
        if token or not self.node.cfg.client_cert_auth:
            return token, ""
        names = list((context.auth_context() or {}).get("x509_common_name") or [])
        return "", names[0].decode() if names else ""

    def user_of(self, token: str, cert_name: str = "") -> str | None:
        """The user of a token, else of a verified client certificate's common name; None while auth is off."""
        if token or not cert_name:
            return self.user_of_token(token)
        st = self.node.sm.auth
        if not st.enabled:
            return None
        if cert_name not in st.users:
            raise unauthenticated(f"auth is enabled: authenticate first (user name and password; the client "
                                  f"certificate's name {cert_name!r} is not a user)")
        return cert_name

    def user_of_token(self, token: str) -> str | None:
        st = self.node.sm.auth
        if not st.enabled:
            return None
        if not token:
            raise unauthenticated("auth is enabled: authenticate first (user name and password)")
        hit = self._verified.get(token)
        if hit is None or hit[1] is not st.token_key:
            try:
                claims, payload, sig = tokens.parse(token)
            except tokens.TokenError as e:
                raise unauthenticated(f"invalid token: {e}") from None
            if not tokens.verify(st.token_key, payload, sig):
                # Never "retry", whatever revision it claims: a forged claim must not buy retries.
                raise unauthenticated("invalid token: bad signature (tampered with, or from before auth "
                                      "was last enabled)")
            if len(self._verified) >= _CACHE_MAX:
                self._verified.clear()
            self._verified[token] = hit = (claims, st.token_key)
        claims = hit[0]
        if claims.auth_revision > st.revision:
            # Issued after an auth change this member has not applied yet: judged here by the older
            # permissions, the caller could still do what the change took away. Try again (elsewhere).
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, (
                f"this member is at auth revision {st.revision}, behind the token's {claims.auth_revision}; "
                "retry"), not_applied=True)
        if claims.auth_revision < st.revision:
            raise unauthenticated(f"token is from auth revision {claims.auth_revision}, the cluster is at "
                                  f"{st.revision}: authenticate again")
        if claims.expires_ms < time.time() * 1000:
            raise unauthenticated("token expired: authenticate again")
        return claims.user

    def permissions(self, user: str) -> UserPermissions:
        perms = self.node.sm.auth.permissions(user)
        if perms is None:
            raise unauthenticated(f"user {user!r} does not exist")
        return perms

    def check_op(self, user: str | None, op: kv_pb2.RequestOp) -> int:
        """PERMISSION_DENIED unless ``user`` may run ``op`` (every op inside a txn too); the auth
        revision checked at (0 while auth is disabled)."""
        if user is None:
            return 0
        perms = self.permissions(user)
        try:
            perms.check_op(op)
        except Denied as e:
            raise permission_denied(str(e)) from None
        return perms.revision

    def check_root(self, context: grpc.aio.ServicerContext, what: str) -> str | None:
        """The caller, who must hold the root role while auth is enabled."""
        user = self.user(context)
        if user is not None and not self.node.sm.auth.is_root(user):
            raise permission_denied(f"permission denied: {what} needs the root role, which user {user!r} lacks")
        return user


#: How long the token of a member's own call to another member lives (see member_metadata).
MEMBER_TOKEN_TTL_MS = 60_000


def member_metadata(node: Node) -> tuple[tuple[str, str], ...] | None:
    """The metadata of a member's own calls to other members' client APIs (the leader's corruption
    check) while auth is enabled: a short-lived root token. A member holds the token key (as it
    holds all the data), so it needs no password to sign one."""
    st = node.sm.auth
    if not st.enabled:
        return None
    expires = int(time.time() * 1000) + MEMBER_TOKEN_TTL_MS
    return ((TOKEN_METADATA_KEY, tokens.issue(st.token_key, ROOT_USER, st.revision, expires)),)


#: Cluster and Maintenance RPCs every client may call: they find members and report health.
OPEN_METHODS = frozenset({"Status", "MemberList"})


class _RootOnly:
    """A servicer whose RPCs (but those in OPEN_METHODS) first check that the caller holds the root role."""

    def __init__(self, servicer: Any, guard: AuthGuard) -> None:
        self._servicer = servicer
        self._guard = guard

    def _check(self, context: grpc.aio.ServicerContext, name: str, request: Any) -> None:
        self._guard.check_root(context, name)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        if name in OPEN_METHODS or name.startswith("_") or not callable(method):
            return method

        if inspect.isasyncgenfunction(method):  # a server-streaming RPC
            @functools.wraps(method)
            async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    self._check(context, name, request)
                except RequestFailed as e:
                    await e.abort(context)
                async for item in method(request, context):
                    yield item

            return checked_stream

        @functools.wraps(method)
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                self._check(context, name, request)
            except RequestFailed as e:
                await e.abort(context)
            return await method(request, context)

        return checked


def root_only(servicer: Any, guard: AuthGuard) -> Any:
    return _RootOnly(servicer, guard)


class _LeaseChecked(_RootOnly):
    """The Lease service under auth, as etcd has it: any authenticated user may grant, keep alive and
    look up leases; a revoke deletes the lease's keys, so it needs write permission on every one."""

    def _check(self, context: grpc.aio.ServicerContext, name: str, request: Any) -> None:
        user = self._guard.user(context)  # UNAUTHENTICATED unless auth is off or the caller is known
        if user is None or name != "LeaseRevoke":
            return
        for key in self._guard.node.sm.lease_keys(request.ID):
            self._guard.check_op(user, kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=key)))


def lease_checked(servicer: Any, guard: AuthGuard) -> Any:
    return _LeaseChecked(servicer, guard)
