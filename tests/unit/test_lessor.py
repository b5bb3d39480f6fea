"""The leader's lease clocks (lessor.py), driven by hand: who expires what, and when."""
from __future__ import annotations

import asyncio
import functools

from kvstore.server import lessor as lessor_mod
from kvstore.server.errors import leadership_lost
from kvstore.server.lessor import Lessor, min_lease_ttl
from kvstore.v1 import command_pb2


class World:
    def __init__(self, monkeypatch) -> None:
        self.now = 100.0
        self.leader = False
        self.term = 1
        self.leases: dict[int, int] = {}
        self.revokes: list[int] = []
        self.fail_revokes = False
        monkeypatch.setattr(lessor_mod.time, "monotonic", lambda: self.now)

    async def propose(self, cmd: command_pb2.Command, timeout: float):
        if self.fail_revokes:
            raise leadership_lost()
        self.revokes.append(cmd.lease.revoke)
        self.leases = {i: t for i, t in self.leases.items() if i != cmd.lease.revoke}
        return command_pb2.CommandResult()

    def lessor(self, **kw) -> Lessor:
        return Lessor(lambda: self.leader, lambda: self.term, lambda: self.leases, self.propose, **kw)


def run_async(fn):
    """Run an async test on a fresh event loop (the revokes are tasks)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_min_ttl_is_one_and_a_half_election_timeouts():
    assert min_lease_ttl(100, 10) == 2 and min_lease_ttl(100, 20) == 3 and min_lease_ttl(10, 10) == 1


@run_async
async def test_followers_never_expire_and_a_new_leader_gives_a_full_ttl(monkeypatch):
    w = World(monkeypatch)
    ls = w.lessor()
    w.leases = {1: 5}
    ls.on_tick()
    w.now += 60  # a follower for a minute: no clock runs, nothing is revoked
    ls.on_tick()
    await settle()
    assert w.revokes == []
    w.leader = True
    ls.on_tick()  # promoted now: 5 s from here
    w.now += 4.9
    ls.on_tick()
    await settle()
    assert w.revokes == []
    w.now += 0.2
    ls.on_tick()
    await settle()
    assert w.revokes == [1]


@run_async
async def test_keep_alive_extends_and_an_expired_lease_is_not_renewed(monkeypatch):
    w = World(monkeypatch)
    w.leader = True
    ls = w.lessor()
    w.leases = {1: 5, 2: 5}
    ls.on_tick()
    w.now += 4
    assert ls.renew(1) == 5 and ls.remaining(1) == 5 and ls.remaining(2) == 1
    assert ls.renew(3) == 0 and ls.remaining(3) == -1
    w.fail_revokes = True  # leadership lost under the revoke: it stays due
    w.now += 1.5
    ls.on_tick()
    await settle()
    assert ls.renew(2) == 0  # past its deadline: a revoke is on its way, not a renewal
    w.fail_revokes = False
    ls.on_tick()
    await settle()
    assert w.revokes == [2]
    w.now += 3.4
    ls.on_tick()
    await settle()
    assert w.revokes == [2]  # lease 1 was renewed 4.9 s ago


@run_async
async def test_a_new_term_restarts_every_clock(monkeypatch):
    w = World(monkeypatch)
    w.leader = True
    ls = w.lessor()
    w.leases = {1: 5}
    ls.on_tick()
    w.now += 4
    w.leader = False
    ls.on_tick()
    w.now += 3
    w.leader, w.term = True, 2
    ls.on_tick()  # 7 s after its last clock start, but a new term: 5 s from now
    await settle()
    assert w.revokes == []


@run_async
async def test_the_testing_switch_keeps_clocks_from_apply(monkeypatch):
    """What the integration test's teeth run: clocks from apply survive promotion (expiring early)."""
    w = World(monkeypatch)
    ls = w.lessor(testing_deadlines_from_apply=True)
    w.leases = {1: 5}
    ls.on_tick()  # a follower sees the grant: its clock starts
    w.now += 6
    w.leader, w.term = True, 2
    ls.on_tick()
    await settle()
    assert w.revokes == [1]
