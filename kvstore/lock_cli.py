"""`kvstore lock NAME [-- CMD ...]` and `kvstore elect NAME [PROPOSAL]`, as etcdctl's.

    kvstore lock jobs/nightly -- ./run-nightly.sh   # runs it holding the lock; KVSTORE_LOCK_TOKEN=<token>
    kvstore lock jobs/nightly                       # prints the key and token, holds until Ctrl-C
    kvstore elect svc/leader host-a                 # campaigns, prints the proclamation once leading
    kvstore elect svc/leader                        # prints the leader's proclamation at every change

A command run under the lock is sent SIGTERM if the lock's lease is lost
(its keep-alives failed past the TTL): another holder may have it by then.
Use the token to fence what the command writes (lock.guard() in Python).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import click

from kvstore.cli import client_errors, console, fail, make_client, show


def _ctrl_c_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt here even when this process was started with SIGINT
    ignored (as a shell starts background jobs): these commands release and resign on it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _lost_signal(sync_lock_or_election) -> threading.Event:
    """A threading.Event set when the lease under a lock or campaign is lost."""
    lost = threading.Event()
    sync_lock_or_election.lease.on_lost(lambda _lease: lost.set())
    return lost


@click.command("lock")
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--ttl", default=60, show_default=True, help="seconds of the lock's lease")
@click.pass_context
@client_errors
def lock(ctx: click.Context, name: str, command: tuple[str, ...], ttl: int) -> None:
    """Take lock NAME; run COMMAND holding it (exit with its status), or hold it until Ctrl-C."""
    _ctrl_c_interrupts()
    with make_client(ctx) as c:
        lk = c.lock(name, ttl=ttl)
        lk.acquire()
        try:
            lost = _lost_signal(lk)
            if not command:
                console.print(f"{show(lk.key)}\ntoken {lk.token}", highlight=False, markup=False)
                try:
                    lost.wait()
                except KeyboardInterrupt:
                    return
                fail(f"lock {name} lost: its lease ran out")
            env = {**os.environ, "KVSTORE_LOCK_KEY": lk.key.decode(errors="replace"),
                   "KVSTORE_LOCK_TOKEN": str(lk.token)}
            try:
                proc = subprocess.Popen(list(command), env=env)
            except OSError as e:
                fail(f"cannot run {command[0]}: {e.strerror or e}")
            try:
                while proc.poll() is None:
                    if lost.wait(0.1):
                        proc.terminate()
                        proc.wait()
                        fail(f"lock {name} lost while {command[0]} ran (its lease ran out): it was sent SIGTERM")
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
            code = proc.returncode
        finally:
            lk.release()
    sys.exit(code if code >= 0 else 128 - code)


@click.command("elect")
@click.argument("name")
@click.argument("proposal", required=False)
@click.option("--ttl", default=60, show_default=True, help="seconds of the candidate's lease")
@click.pass_context
@client_errors
def elect(ctx: click.Context, name: str, proposal: str | None, ttl: int) -> None:
    """Campaign in election NAME with PROPOSAL and lead until Ctrl-C; without PROPOSAL, print the
    leader's proclamation now and at every change."""
    _ctrl_c_interrupts()
    with make_client(ctx) as c:
        e = c.election(name, ttl=ttl)
        if proposal is None:
            try:
                for kv in e.observe():
                    console.print(f"{show(kv.key)}\n{show(kv.value)}", highlight=False, markup=False)
            except KeyboardInterrupt:
                return
            return
        e.campaign(proposal)
        try:
            console.print(f"{show(e.key)}\n{proposal}", highlight=False, markup=False)
            lost = _lost_signal(e)
            try:
                lost.wait()
            except KeyboardInterrupt:
                return
            fail(f"election {name}: leadership lost (its lease ran out)")
        finally:
            e.resign()
