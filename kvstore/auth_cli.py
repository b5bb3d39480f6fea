"""`kvstore user|role|auth ...`: users, roles, permissions and auth itself, as etcdctl's.

    kvstore user add root                          # asks for the password (or root:PASSWORD)
    kvstore role add app
    kvstore role grant-permission --prefix app readwrite app/
    kvstore user add alice:secret && kvstore user grant-role alice app
    kvstore auth enable                            # refused until the user root exists
    kvstore --user alice put app/x 1               # asks for alice's password
"""
from __future__ import annotations

import click

from kvstore.cli import client_errors, console, fail, make_client, show

PERM_TYPES = ("read", "write", "readwrite")


def credentials(spec: str | None) -> tuple[str | None, str | None]:
    """(user, password) from --user NAME[:PASSWORD]; asks for the password when it is not given."""
    if not spec:
        return None, None
    name, sep, password = spec.partition(":")
    if not name:
        fail("--user: the user name is empty")
    if not sep:
        password = click.prompt(f"Password of {name}", hide_input=True, err=True)
    return name, password


def _new_password(name_spec: str, given: str | None, confirm: bool = True) -> tuple[str, str]:
    """(name, password) from NAME[:PASSWORD] or --new-user-password; asks (twice) when neither gives one."""
    name, sep, password = name_spec.partition(":")
    if not name:
        fail("the user name is empty")
    if given is not None:
        password = given
    elif not sep:
        password = click.prompt(f"Password of {name}", hide_input=True, confirmation_prompt=confirm, err=True)
    if not password:
        fail("the password is empty")
    return name, password


def _done(what: str, revision: int) -> None:
    console.print(f"{what} (auth revision {revision})", highlight=False)


# ------------------------------------------------------------------------------ user


@click.group()
def user() -> None:
    """Users: add, delete, passwd, list, get, grant-role, revoke-role."""


@user.command("add")
@click.argument("name")
@click.option("--new-user-password", default=None, help="the password (else NAME:PASSWORD, else asked for)")
@click.pass_context
@client_errors
def user_add(ctx: click.Context, name: str, new_user_password: str | None) -> None:
    """Add user NAME[:PASSWORD] (the user root also gets the root role)."""
    name, password = _new_password(name, new_user_password)
    with make_client(ctx) as c:
        _done(f"User {name} created", c.user_add(name, password))


@user.command("delete")
@click.argument("name")
@click.pass_context
@client_errors
def user_delete(ctx: click.Context, name: str) -> None:
    """Delete user NAME."""
    with make_client(ctx) as c:
        _done(f"User {name} deleted", c.user_delete(name))


@user.command("passwd")
@click.argument("name")
@click.option("--new-user-password", default=None, help="the new password (else asked for)")
@click.pass_context
@client_errors
def user_passwd(ctx: click.Context, name: str, new_user_password: str | None) -> None:
    """Change the password of user NAME."""
    name, password = _new_password(name, new_user_password)
    with make_client(ctx) as c:
        _done("Password updated", c.user_change_password(name, password))


@user.command("list")
@click.pass_context
@client_errors
def user_list(ctx: click.Context) -> None:
    """Every user, one per line."""
    with make_client(ctx) as c:
        for name in c.user_list():
            console.print(name, highlight=False)


@user.command("get")
@click.argument("name")
@click.pass_context
@client_errors
def user_get(ctx: click.Context, name: str) -> None:
    """The roles user NAME holds."""
    with make_client(ctx) as c:
        roles = c.user_get(name)
    console.print(f"User: {name}\nRoles: {' '.join(roles)}", highlight=False)


@user.command("grant-role")
@click.argument("name")
@click.argument("role")
@click.pass_context
@client_errors
def user_grant_role(ctx: click.Context, name: str, role: str) -> None:
    """Give user NAME the role ROLE."""
    with make_client(ctx) as c:
        _done(f"Role {role} is granted to user {name}", c.user_grant_role(name, role))


@user.command("revoke-role")
@click.argument("name")
@click.argument("role")
@click.pass_context
@client_errors
def user_revoke_role(ctx: click.Context, name: str, role: str) -> None:
    """Take the role ROLE from user NAME."""
    with make_client(ctx) as c:
        _done(f"Role {role} is revoked from user {name}", c.user_revoke_role(name, role))


# ------------------------------------------------------------------------------ role


@click.group()
def role() -> None:
    """Roles: add, delete, list, get, grant-permission, revoke-permission."""


@role.command("add")
@click.argument("name")
@click.pass_context
@client_errors
def role_add(ctx: click.Context, name: str) -> None:
    """Add role NAME (with no permissions yet)."""
    with make_client(ctx) as c:
        _done(f"Role {name} created", c.role_add(name))


@role.command("delete")
@click.argument("name")
@click.pass_context
@client_errors
def role_delete(ctx: click.Context, name: str) -> None:
    """Delete role NAME (its users lose it)."""
    with make_client(ctx) as c:
        _done(f"Role {name} deleted", c.role_delete(name))


@role.command("list")
@click.pass_context
@client_errors
def role_list(ctx: click.Context) -> None:
    """Every role, one per line."""
    with make_client(ctx) as c:
        for name in c.role_list():
            console.print(name, highlight=False)


def _describe(key: bytes, end: bytes) -> str:
    if not end:
        return show(key)
    if end == b"\0":
        return f"[{show(key)}, <all keys>)"
    from kvstore.client.types import prefix_end

    note = f" (prefix {show(key)})" if end == prefix_end(key) else ""
    return f"[{show(key)}, {show(end)}){note}"


@role.command("get")
@click.argument("name")
@click.pass_context
@client_errors
def role_get(ctx: click.Context, name: str) -> None:
    """The permissions of role NAME."""
    with make_client(ctx) as c:
        perms = c.role_get(name)
    console.print(f"Role {name}", highlight=False)
    for kind in ("read", "write"):
        console.print(f"KV {kind.capitalize()}:", highlight=False)
        for ptype, key, end in perms:
            if kind in ptype:
                console.print(f"\t{_describe(key, end)}", highlight=False)


def _range(key: str, end: str | None, prefix: bool) -> tuple[str, str | None, bool]:
    if prefix and end is not None:
        fail("give either --prefix or an END, not both")
    return key, end, prefix


@role.command("grant-permission")
@click.option("--prefix", is_flag=True, help="KEY is a prefix: every key starting with it")
@click.argument("name")
@click.argument("perm_type", metavar="read|write|readwrite", type=click.Choice(PERM_TYPES))
@click.argument("key")
@click.argument("end", required=False)
@click.pass_context
@client_errors
def role_grant_permission(ctx: click.Context, prefix: bool, name: str, perm_type: str, key: str,
                          end: str | None) -> None:
    """Let role NAME read, write or readwrite KEY, [KEY, END), or every key starting with KEY (--prefix)."""
    key, end, prefix = _range(key, end, prefix)
    with make_client(ctx) as c:
        _done(f"Role {name} updated", c.role_grant_permission(name, perm_type, key, end, prefix=prefix))


@role.command("revoke-permission")
@click.option("--prefix", is_flag=True, help="KEY is a prefix, as it was granted")
@click.argument("name")
@click.argument("key")
@click.argument("end", required=False)
@click.pass_context
@client_errors
def role_revoke_permission(ctx: click.Context, prefix: bool, name: str, key: str, end: str | None) -> None:
    """Take back the permission of role NAME on KEY (or [KEY, END), or the prefix), as granted."""
    key, end, prefix = _range(key, end, prefix)
    with make_client(ctx) as c:
        _done(f"Permission of role {name} revoked", c.role_revoke_permission(name, key, end, prefix=prefix))


# ------------------------------------------------------------------------------ auth


@click.group()
def auth() -> None:
    """Authentication: enable, disable, status."""


@auth.command("enable")
@click.pass_context
@client_errors
def auth_enable(ctx: click.Context) -> None:
    """Turn authentication on (refused until the user root exists)."""
    with make_client(ctx) as c:
        _done("Authentication Enabled", c.auth_enable())


@auth.command("disable")
@click.pass_context
@client_errors
def auth_disable(ctx: click.Context) -> None:
    """Turn authentication off."""
    with make_client(ctx) as c:
        _done("Authentication Disabled", c.auth_disable())


@auth.command("status")
@click.pass_context
@client_errors
def auth_status(ctx: click.Context) -> None:
    """Whether authentication is on, and the auth revision."""
    with make_client(ctx) as c:
        enabled, revision = c.auth_status()
    console.print(f"Authentication Status: {'true' if enabled else 'false'}\nAuthRevision: {revision}",
                  highlight=False)
