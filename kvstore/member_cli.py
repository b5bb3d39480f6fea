"""`kvstore member list|add|remove|promote|update`: membership changes, as etcdctl's.

    kvstore member add node4 --peer-urls 127.0.0.1:2680 --client-urls 127.0.0.1:2679 --learner
    kvstore serve --id 4 --initial-cluster-state existing ...   # the lines `member add` prints
    kvstore member promote 4
    kvstore member remove 1
    kvstore member update 2 --peer-urls 10.0.0.2:2380
"""
from __future__ import annotations

import click

from kvstore import write_out as wo
from kvstore.cli import client_errors, console, make_client, write_out_option


def _print(members, write_out: str) -> None:
    if write_out == "json":
        click.echo(wo.dumps(wo.members_doc(members)))
        return
    for m in members:
        role = "learner" if m.is_learner else "voter"
        console.print(f"{m.id}\t{m.name}\t{role}\tpeer={','.join(m.peer_urls)}\tclient={','.join(m.client_urls)}",
                      highlight=False)


def _flags(members) -> str:
    """The --initial-cluster flags of a new member: every member's peer and client address, by id."""
    def strip(u: str) -> str:
        return u.split("://", 1)[-1]

    peers = ",".join(f"{m.id}={strip(m.peer_urls[0])}" for m in members if m.peer_urls)
    # a member added without --client-urls: the operator fills in where it will serve clients
    clients = ",".join(f"{m.id}={strip(m.client_urls[0]) if m.client_urls else 'CLIENT_HOST:PORT'}" for m in members)
    return f"--initial-cluster {peers} --initial-cluster-clients {clients} --initial-cluster-state existing"


@click.group()
def member() -> None:
    """List the members, add, remove, promote or update one."""


@member.command("list")
@write_out_option
@click.pass_context
@client_errors
def member_list(ctx: click.Context, write_out: str) -> None:
    """Every member: id, name, voter or learner, peer and client URLs."""
    with make_client(ctx) as c:
        _print(c.members(), write_out)


@member.command("add")
@click.argument("name")
@click.option("--peer-urls", required=True, help="the new member's peer address(es), comma-separated")
@click.option("--client-urls", default="", help="the new member's client address(es), comma-separated")
@click.option("--learner", is_flag=True, help="add it as a non-voting learner (promote it once caught up)")
@click.pass_context
@client_errors
def member_add(ctx: click.Context, name: str, peer_urls: str, client_urls: str, learner: bool) -> None:
    """Add a member; prints its id and the flags to start it with."""
    peers = [u.strip() for u in peer_urls.split(",") if u.strip()]
    clients = [u.strip() for u in client_urls.split(",") if u.strip()]
    with make_client(ctx) as c:
        new, members = c.member_add(peers, clients, learner=learner, name=name)
    console.print(f"Member {new.id} ({new.name}) added as a {'learner' if learner else 'voter'}.", highlight=False)
    console.print(f"Start it on an empty data dir with:\n  kvstore serve --id {new.id} --name {new.name} "
                  f"{_flags(members)}", highlight=False, soft_wrap=True)


@member.command("remove")
@click.argument("member_id", type=int)
@click.pass_context
@client_errors
def member_remove(ctx: click.Context, member_id: int) -> None:
    """Remove a member (the leader too: it hands over first); the removed member stops itself."""
    with make_client(ctx) as c:
        c.member_remove(member_id)
    console.print(f"Member {member_id} removed.", highlight=False)


@member.command("promote")
@click.argument("member_id", type=int)
@click.pass_context
@client_errors
def member_promote(ctx: click.Context, member_id: int) -> None:
    """Make a learner a voter (refused, with its lag, until it has caught up)."""
    with make_client(ctx) as c:
        c.member_promote(member_id)
    console.print(f"Member {member_id} promoted to voter.", highlight=False)


@member.command("update")
@click.argument("member_id", type=int)
@click.option("--peer-urls", required=True, help="the member's new peer address(es), comma-separated")
@click.pass_context
@client_errors
def member_update(ctx: click.Context, member_id: int, peer_urls: str) -> None:
    """Change a member's peer address (the others reconnect to it there)."""
    with make_client(ctx) as c:
        c.member_update(member_id, [u.strip() for u in peer_urls.split(",") if u.strip()])
    console.print(f"Member {member_id} updated.", highlight=False)
