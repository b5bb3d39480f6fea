"""`kvstore check hash` and `kvstore alarm list|disarm`: consistency checks, as etcdctl's.

    kvstore check hash      # every member's key/value hash at one log index; names any that differ
    kvstore alarm list      # e.g. "memberID:3 alarm:CORRUPT"
    kvstore alarm disarm    # clear alarms (after the member has been rebuilt)
"""
from __future__ import annotations

import sys

import click

from kvstore.cli import client_errors, console, fail, make_client


@click.group()
def check() -> None:
    """Consistency checks across members."""


@check.command("hash")
@click.pass_context
@client_errors
def check_hash(ctx: click.Context) -> None:
    """Compare every member's key/value hash at the same log index; exit 1 naming any member that differs.

    The leader places a hash barrier in the log; each member hashes its state
    when it applies that entry, so all hash exactly the same point.
    """
    from kvstore.client import KvstoreError
    from kvstore.server.corruption import differing
    from kvstore.storage.hash_kv import HashMark

    with make_client(ctx) as c:
        leader_addr, first = c.hash_kv(0)
        marks: dict[int, HashMark] = {first.header.member_id: HashMark(first.index, first.revision, first.hash)}
        addrs: dict[int, str] = {first.header.member_id: leader_addr}
        unanswered: list[str] = []
        for ep in ctx.obj["endpoints"]:
            try:
                addr, r = c.hash_kv(first.index, ep)
            except KvstoreError as e:
                unanswered.append(f"{ep}: {e}")
                continue
            marks[r.header.member_id] = HashMark(r.index, r.revision, r.hash)
            addrs[r.header.member_id] = addr
    for member_id, m in sorted(marks.items()):
        console.print(f"member {member_id}\t{addrs[member_id]}\tindex {m.index}\trevision {m.revision}\t"
                      f"hash {m.hash:08x}", highlight=False)
    for line in unanswered:
        console.print(f"no answer from {line}", highlight=False)
    try:
        bad = differing(marks)
    except ValueError as e:
        fail(str(e))
    if bad:
        fail("CORRUPT: " + ", ".join(f"member {i} ({addrs[i]})" for i in bad) +
             f" differs from the majority at index {first.index}")
    if unanswered:
        fail(f"{len(unanswered)} member(s) did not answer; the {len(marks)} that did agree")
    console.print(f"OK: all {len(marks)} members agree at index {first.index}", highlight=False)


@click.group()
def alarm() -> None:
    """Alarms raised about members (CORRUPT)."""


def _print_alarms(alarms: list[tuple[int, str]]) -> None:
    for member_id, name in alarms:
        console.print(f"memberID:{member_id} alarm:{name}", highlight=False)


@alarm.command("list")
@click.pass_context
@client_errors
def alarm_list(ctx: click.Context) -> None:
    """List the active alarms (nothing when there are none)."""
    with make_client(ctx) as c:
        _print_alarms(c.alarms())


@alarm.command("disarm")
@click.option("--member", "member_id", default=0, help="only this member's alarms (default: every member's)")
@click.pass_context
@client_errors
def alarm_disarm(ctx: click.Context, member_id: int) -> None:
    """Clear alarms; prints those still active (none, normally)."""
    with make_client(ctx) as c:
        left = c.alarms(disarm=True, member_id=member_id)
    _print_alarms(left)
    sys.exit(1 if left else 0)
