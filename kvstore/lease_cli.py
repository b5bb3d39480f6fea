"""`kvstore lease grant|revoke|timetolive|keep-alive|list`, as etcdctl's (lease ids in hexadecimal).

    kvstore lease grant 10            # lease 694d5765fc71500b granted with TTL(10s)
    kvstore put svc/a addr --lease 694d5765fc71500b
    kvstore lease timetolive 694d5765fc71500b --keys
    kvstore lease keep-alive 694d5765fc71500b     # until Ctrl-C, or the lease is gone (exit 1)
    kvstore lease revoke 694d5765fc71500b
"""
from __future__ import annotations

import time

import click

from kvstore.cli import client_errors, console, fail, make_client


def parse_lease_id(text: str) -> int:
    """A lease id as etcdctl prints it (hexadecimal); a clear error otherwise."""
    try:
        lease_id = int(text, 16)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a lease id (hexadecimal, as `lease grant` prints it)") from None
    if lease_id <= 0 or lease_id >= 1 << 63:
        raise click.BadParameter(f"{text!r} is not a lease id (1 to 7fffffffffffffff)")
    return lease_id


class LeaseId(click.ParamType):
    name = "LEASE_ID"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_lease_id(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


LEASE_ID = LeaseId()


@click.group()
def lease() -> None:
    """Leases: keys that are deleted when their lease expires or is revoked."""


@lease.command("grant")
@click.argument("ttl", type=click.IntRange(min=1))
@click.pass_context
@client_errors
def lease_grant(ctx: click.Context, ttl: int) -> None:
    """Grant a lease of TTL seconds (raised to the cluster's minimum)."""
    with make_client(ctx) as c:
        g = c.lease_grant(ttl)
    console.print(f"lease {g.id:016x} granted with TTL({g.ttl}s)", highlight=False)


@lease.command("revoke")
@click.argument("lease_id", type=LEASE_ID)
@click.pass_context
@client_errors
def lease_revoke(ctx: click.Context, lease_id: int) -> None:
    """Revoke a lease, deleting every key attached to it."""
    with make_client(ctx) as c:
        c.lease_revoke(lease_id)
    console.print(f"lease {lease_id:016x} revoked", highlight=False)


@lease.command("timetolive")
@click.argument("lease_id", type=LEASE_ID)
@click.option("--keys", is_flag=True, help="also list the keys attached to the lease")
@click.pass_context
@client_errors
def lease_timetolive(ctx: click.Context, lease_id: int, keys: bool) -> None:
    """Print a lease's granted TTL and the seconds left."""
    with make_client(ctx) as c:
        t = c.lease_time_to_live(lease_id, keys=keys)
    if t.ttl < 0:
        console.print(f"lease {lease_id:016x} already expired", highlight=False)
        return
    line = f"lease {lease_id:016x} granted with TTL({t.granted_ttl}s), remaining({t.ttl}s)"
    if keys:
        line += ", attached keys([" + " ".join(k.decode(errors="replace") for k in t.keys) + "])"
    console.print(line, highlight=False, soft_wrap=True, markup=False)


@lease.command("keep-alive")
@click.argument("lease_id", type=LEASE_ID)
@click.option("--once", is_flag=True, help="one keep-alive, then exit")
@click.pass_context
@client_errors
def lease_keep_alive(ctx: click.Context, lease_id: int, once: bool) -> None:
    """Keep a lease alive (every TTL/3) until Ctrl-C; exit 1 once the lease is gone."""
    with make_client(ctx) as c:
        try:
            while True:
                ttl = c.lease_keep_alive_once(lease_id)
                if ttl <= 0:
                    fail(f"lease {lease_id:016x} expired or revoked")
                console.print(f"lease {lease_id:016x} keepalived with TTL({ttl})", highlight=False)
                if once:
                    return
                time.sleep(max(ttl / 3, 0.5))
        except KeyboardInterrupt:
            return


@lease.command("list")
@click.pass_context
@client_errors
def lease_list(ctx: click.Context) -> None:
    """List every lease."""
    with make_client(ctx) as c:
        ids = c.leases()
    console.print(f"found {len(ids)} leases", highlight=False)
    for i in ids:
        console.print(f"{i:016x}", highlight=False)
