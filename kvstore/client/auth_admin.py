"""The Auth API on the client: enable auth, manage users, roles and permissions (etcd's verbs).

A mixin of AsyncClient (it calls ``_call``, so redirects, retries and token
renewal apply); the blocking Client wraps each method (AUTH_ADMIN_METHODS).
While auth is enabled every one of these but ``auth_status`` needs a user with
the root role.
"""
from __future__ import annotations

from typing import Any

from kvstore.client.coalescer import LEADER
from kvstore.client.types import BytesLike, prefix_end, to_bytes
from kvstore.v1 import auth_pb2

__all__ = ["AuthAdmin", "AUTH_ADMIN_METHODS", "PERMISSION_TYPES", "Permission"]

#: Permission types by their CLI and API names.
PERMISSION_TYPES: dict[str, int] = {
    "read": auth_pb2.Permission.READ,
    "write": auth_pb2.Permission.WRITE,
    "readwrite": auth_pb2.Permission.READWRITE,
}
_TYPE_NAMES = {v: k for k, v in PERMISSION_TYPES.items()}

AUTH_ADMIN_METHODS = (
    "auth_enable", "auth_disable", "auth_status", "user_add", "user_delete", "user_change_password",
    "user_list", "user_get", "user_grant_role", "user_revoke_role", "role_add", "role_delete", "role_list",
    "role_get", "role_grant_permission", "role_revoke_permission",
)

Permission = tuple[str, bytes, bytes]  # (type name, key, range_end)


def key_range(key: BytesLike, end: BytesLike | None, prefix: bool) -> tuple[bytes, bytes]:
    """(key, range_end) for a single key, [key, end), or every key starting with key (prefix)."""
    k = to_bytes(key)
    if prefix:
        if end is not None:
            raise ValueError("give either prefix=True or an end, not both")
        return k, prefix_end(k)
    return k, b"" if end is None else to_bytes(end)


class AuthAdmin:
    async def _call(self, method: str, request: Any, *, route: str, mutation: bool,
                    timeout: float | None, with_addr: bool = False) -> Any:
        raise NotImplementedError  # AsyncClient's

    async def _auth(self, method: str, request: Any, timeout: float | None) -> Any:
        return await self._call(method, request, route=LEADER, mutation=False, timeout=timeout)

    async def auth_enable(self, *, timeout: float | None = None) -> int:
        """Turn auth on (refused until the user ``root`` exists); returns the auth revision."""
        return int((await self._auth("AuthEnable", auth_pb2.AuthEnableRequest(), timeout)).auth_revision)

    async def auth_disable(self, *, timeout: float | None = None) -> int:
        return int((await self._auth("AuthDisable", auth_pb2.AuthDisableRequest(), timeout)).auth_revision)

    async def auth_status(self, *, timeout: float | None = None) -> tuple[bool, int]:
        """(whether auth is enabled, the auth revision)."""
        resp = await self._auth("AuthStatus", auth_pb2.AuthStatusRequest(), timeout)
        return bool(resp.enabled), int(resp.auth_revision)

    async def user_add(self, name: str, password: str, *, timeout: float | None = None) -> int:
        """Add a user (the user ``root`` gets the root role); returns the auth revision."""
        req = auth_pb2.UserAddRequest(name=name, password=password)
        return int((await self._auth("UserAdd", req, timeout)).auth_revision)

    async def user_delete(self, name: str, *, timeout: float | None = None) -> int:
        return int((await self._auth("UserDelete", auth_pb2.UserDeleteRequest(name=name), timeout)).auth_revision)

    async def user_change_password(self, name: str, password: str, *, timeout: float | None = None) -> int:
        req = auth_pb2.UserChangePasswordRequest(name=name, password=password)
        return int((await self._auth("UserChangePassword", req, timeout)).auth_revision)

    async def user_list(self, *, timeout: float | None = None) -> list[str]:
        return list((await self._auth("UserList", auth_pb2.UserListRequest(), timeout)).users)

    async def user_get(self, name: str, *, timeout: float | None = None) -> list[str]:
        """The roles ``name`` holds."""
        return list((await self._auth("UserGet", auth_pb2.UserGetRequest(name=name), timeout)).roles)

    async def user_grant_role(self, user: str, role: str, *, timeout: float | None = None) -> int:
        req = auth_pb2.UserGrantRoleRequest(user=user, role=role)
        return int((await self._auth("UserGrantRole", req, timeout)).auth_revision)

    async def user_revoke_role(self, user: str, role: str, *, timeout: float | None = None) -> int:
        req = auth_pb2.UserRevokeRoleRequest(name=user, role=role)
        return int((await self._auth("UserRevokeRole", req, timeout)).auth_revision)

    async def role_add(self, name: str, *, timeout: float | None = None) -> int:
        return int((await self._auth("RoleAdd", auth_pb2.RoleAddRequest(name=name), timeout)).auth_revision)

    async def role_delete(self, name: str, *, timeout: float | None = None) -> int:
        return int((await self._auth("RoleDelete", auth_pb2.RoleDeleteRequest(role=name), timeout)).auth_revision)

    async def role_list(self, *, timeout: float | None = None) -> list[str]:
        return list((await self._auth("RoleList", auth_pb2.RoleListRequest(), timeout)).roles)

    async def role_get(self, name: str, *, timeout: float | None = None) -> list[Permission]:
        """The role's permissions as (type, key, range_end)."""
        resp = await self._auth("RoleGet", auth_pb2.RoleGetRequest(role=name), timeout)
        return [(_TYPE_NAMES[p.perm_type], bytes(p.key), bytes(p.range_end)) for p in resp.perm]

    async def role_grant_permission(self, role: str, perm_type: str, key: BytesLike, end: BytesLike | None = None,
                                    *, prefix: bool = False, timeout: float | None = None) -> int:
        """Let ``role`` read, write or readwrite one key, [key, end), or a prefix."""
        if perm_type not in PERMISSION_TYPES:
            raise ValueError(f"permission type must be one of {', '.join(PERMISSION_TYPES)}, not {perm_type!r}")
        k, e = key_range(key, end, prefix)
        perm = auth_pb2.Permission(perm_type=PERMISSION_TYPES[perm_type], key=k, range_end=e)  # type: ignore[arg-type]
        req = auth_pb2.RoleGrantPermissionRequest(name=role, perm=perm)
        return int((await self._auth("RoleGrantPermission", req, timeout)).auth_revision)

    async def role_revoke_permission(self, role: str, key: BytesLike, end: BytesLike | None = None, *,
                                     prefix: bool = False, timeout: float | None = None) -> int:
        k, e = key_range(key, end, prefix)
        req = auth_pb2.RoleRevokePermissionRequest(role=role, key=k, range_end=e)
        return int((await self._auth("RoleRevokePermission", req, timeout)).auth_revision)
