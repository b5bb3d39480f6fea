"""The Auth API: authenticate, and manage users, roles and permissions (etcd's v3 Auth service).

Changes are proposed through Raft as `Command.auth` and applied by every member
(kvstore/storage/auth_store.py decides whether each one may apply). Passwords
are hashed here, on the member that receives them, before anything is
proposed. Reads of the auth state wait for a ReadIndex confirmation, so they
reflect every change acknowledged before them. While auth is enabled every
call but Authenticate and AuthStatus needs the root role.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any

import grpc

from kvstore.storage.auth_store import MAX_NAME_BYTES, TOKEN_KEY_BYTES
from kvstore.storage.errors import AUTH_NOT_ENABLED, ApplyError
from kvstore.v1 import auth_pb2, auth_pb2_grpc, command_pb2

from . import tokens
from .auth_guard import AuthGuard, unauthenticated
from .auth_limiter import FailureLimiter
from .errors import RequestFailed, invalid_argument
from .kv_service import apply_error, handles_errors
from .node import Node
from .passwords import MAX_PASSWORD_BYTES, hash_password, verify_password

__all__ = ["AuthService"]

log = logging.getLogger("kvstore.auth")

@functools.cache
def _dummy_hash() -> bytes:
    """Checked against when the user does not exist, so that a wrong name costs as long as a wrong password."""
    return hash_password(os.urandom(8).hex())


def client_addr(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1")."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class AuthService(auth_pb2_grpc.AuthServicer):
    def __init__(self, node: Node, guard: AuthGuard, token_ttl_s: float,
                 limiter: FailureLimiter | None = None) -> None:
        self.node = node
        self.guard = guard
        self.token_ttl_ms = int(token_ttl_s * 1000)
        self.limiter = limiter or FailureLimiter()
        self.default_timeout = node.cfg.request_timeout_ms / 1000

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        left = context.time_remaining()
        return self.default_timeout if left is None else max(0.0, min(left, self.default_timeout))

    async def _change(self, context: grpc.aio.ServicerContext, req: auth_pb2.AuthRequest) -> auth_pb2.AuthChangeResponse:
        user = self.guard.check_root(context, "changing auth")
        cmd = command_pb2.Command(auth=req, auth_user=user or "")
        result = await self.node.propose_internal(cmd, self._timeout(context))
        if isinstance(result, ApplyError):
            raise apply_error(result)
        log.info("auth change %s by %s: auth revision %d", req.WhichOneof("request"),
                 repr(user) if user else "a client (auth disabled)", result.revision)
        return auth_pb2.AuthChangeResponse(header=self.node.header(), auth_revision=result.revision)

    async def _read(self, context: grpc.aio.ServicerContext, what: str) -> Any:
        """The auth state after a ReadIndex confirmation, for a root caller."""
        self.guard.check_root(context, what)
        await self.node.read_barrier(self._timeout(context))
        return self.node.sm.auth

    @staticmethod
    async def _hashed(password: str) -> bytes:
        if not password:
            raise invalid_argument("password is empty")
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            raise invalid_argument(f"password is longer than {MAX_PASSWORD_BYTES} bytes")
        return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)

    # ---- enable, disable, status, authenticate ------------------------------

    @handles_errors
    async def AuthEnable(self, request, context) -> auth_pb2.AuthChangeResponse:
        key = os.urandom(TOKEN_KEY_BYTES)  # the token key every member will hold (see tokens.py)
        return await self._change(context, auth_pb2.AuthRequest(enable=auth_pb2.AuthEnableRequest(token_key=key)))

    @handles_errors
    async def AuthDisable(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(disable=auth_pb2.AuthDisableRequest()))

    @handles_errors
    async def AuthStatus(self, request, context) -> auth_pb2.AuthStatusResponse:
        await self.node.read_barrier(self._timeout(context))
        st = self.node.sm.auth
        return auth_pb2.AuthStatusResponse(header=self.node.header(), enabled=st.enabled, auth_revision=st.revision)

    @handles_errors
    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context) -> auth_pb2.AuthenticateResponse:
        addr = client_addr(context)
        blocked = self.limiter.blocked(request.name, addr)
        if blocked is not None:
            what, wait = blocked
            log.warning("authentication refused for user %r from %s: too many failures for %s", request.name,
                        addr, what)
            raise unauthenticated(  # not RESOURCE_EXHAUSTED: clients retry that, and must not here
                f"too many failed authentications for {what}: retry in {max(wait, 0.1):.1f} s")
        if len(request.name.encode()) > MAX_NAME_BYTES:
            raise invalid_argument(f"user name is longer than {MAX_NAME_BYTES} bytes")
        if len(request.password.encode()) > MAX_PASSWORD_BYTES:
            raise invalid_argument(f"password is longer than {MAX_PASSWORD_BYTES} bytes")
        await self.node.read_barrier(self._timeout(context))  # sees every user change acknowledged before
        st = self.node.sm.auth
        if not st.enabled:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, AUTH_NOT_ENABLED, not_applied=True)
        user = st.users.get(request.name)
        stored = user.hashed_password if user is not None else _dummy_hash()
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, request.password, stored)
        if not ok or user is None:
            self.limiter.failed(request.name, addr)
            log.warning("authentication failed for user %r from %s (%s)", request.name, addr,
                        "unknown user" if user is None else "wrong password")
            raise unauthenticated("authentication failed: invalid user name or password")
        expires = int(time.time() * 1000) + self.token_ttl_ms
        token = tokens.issue(st.token_key, request.name, st.revision, expires)
        return auth_pb2.AuthenticateResponse(header=self.node.header(), token=token)

    # ---- users --------------------------------------------------------------

    @handles_errors
    async def UserAdd(self, request: auth_pb2.UserAddRequest, context) -> auth_pb2.AuthChangeResponse:
        self.guard.check_root(context, "changing auth")  # before the KDF's work
        req = auth_pb2.UserAddRequest(name=request.name, hashed_password=await self._hashed(request.password))
        return await self._change(context, auth_pb2.AuthRequest(user_add=req))

    @handles_errors
    async def UserChangePassword(self, request, context) -> auth_pb2.AuthChangeResponse:
        self.guard.check_root(context, "changing auth")
        req = auth_pb2.UserChangePasswordRequest(name=request.name,
                                                 hashed_password=await self._hashed(request.password))
        return await self._change(context, auth_pb2.AuthRequest(user_change_password=req))

    @handles_errors
    async def UserDelete(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(user_delete=request))

    @handles_errors
    async def UserGrantRole(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(user_grant_role=request))

    @handles_errors
    async def UserRevokeRole(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(user_revoke_role=request))

    @handles_errors
    async def UserGet(self, request: auth_pb2.UserGetRequest, context) -> auth_pb2.UserGetResponse:
        st = await self._read(context, "reading users")
        user = st.users.get(request.name)
        if user is None:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, f"user {request.name!r} not found",
                                not_applied=True)
        return auth_pb2.UserGetResponse(header=self.node.header(), roles=list(user.roles))

    @handles_errors
    async def UserList(self, request, context) -> auth_pb2.UserListResponse:
        st = await self._read(context, "reading users")
        return auth_pb2.UserListResponse(header=self.node.header(), users=sorted(st.users))

    # ---- roles --------------------------------------------------------------

    @handles_errors
    async def RoleAdd(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(role_add=request))

    @handles_errors
    async def RoleDelete(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(role_delete=request))

    @handles_errors
    async def RoleGrantPermission(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(role_grant_permission=request))

    @handles_errors
    async def RoleRevokePermission(self, request, context) -> auth_pb2.AuthChangeResponse:
        return await self._change(context, auth_pb2.AuthRequest(role_revoke_permission=request))

    @handles_errors
    async def RoleGet(self, request: auth_pb2.RoleGetRequest, context) -> auth_pb2.RoleGetResponse:
        st = await self._read(context, "reading roles")
        if request.role == "root":
            return auth_pb2.RoleGetResponse(header=self.node.header(), perm=[
                auth_pb2.Permission(perm_type=auth_pb2.Permission.READWRITE, key=b"\0", range_end=b"\0")])
        role = st.roles.get(request.role)
        if role is None:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, f"role {request.role!r} not found",
                                not_applied=True)
        return auth_pb2.RoleGetResponse(header=self.node.header(), perm=list(role.perms))

    @handles_errors
    async def RoleList(self, request, context) -> auth_pb2.RoleListResponse:
        st = await self._read(context, "reading roles")
        return auth_pb2.RoleListResponse(header=self.node.header(), roles=sorted({"root", *st.roles}))
