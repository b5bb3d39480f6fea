"""The ``member`` nemesis: remove a random member, wipe its data, add it back as a learner,
and promote it when the window heals.

The harness keeps its node slots (one process, data dir and address each);
the member in a slot gets a new raft id each time it is added back (ids are
never reused), so the slot is restarted with ``--id NEW --initial-cluster
... --initial-cluster-state existing`` (given last: they win). Leader
tracking already maps member ids to slots (LeaderWatch).

With ``--network proxy`` the re-added member is registered at its own peer
listener, so the others reach it directly, not through their proxies:
partitions then cut only its outgoing side. ``--network netns`` (root) has
no such gap.
"""
from __future__ import annotations

import random
import shutil
import time
from typing import Any

from kvstore.jepsen.nemesis import Injected, Package
from kvstore.server.config import format_members, parse_members

REMOVE_STOP_S = 10.0  # a removed member stops itself; after this long it is killed
CHANGE_TIMEOUT_S = 20.0


class Membership:
    """Slot <-> member id, and the membership changes the nemesis makes (over the real client)."""

    def __init__(self, procs: Any, client_addrs: dict[int, str], tls: Any = None) -> None:
        self.procs = procs
        self.cluster = procs.cluster
        self.client_addrs = client_addrs
        self.tls = tls
        self.ids = {slot: slot for slot in client_addrs}  # slot -> its member's id now
        self.base_args = {slot: list(self.cluster.node_args.get(slot, [])) for slot in client_addrs}

    def _client(self, slots: list[int]) -> Any:
        from kvstore.client import Client

        return Client([self.client_addrs[s] for s in slots], timeout=CHANGE_TIMEOUT_S, tls=self.tls)

    def _peer_addrs_seen_by(self, slot: int) -> dict[int, str]:
        """Slot -> the address `slot` reaches it at (its own proxies in proxy mode)."""
        for i, arg in enumerate(self.base_args[slot]):
            if arg == "--initial-cluster":
                return parse_members(self.base_args[slot][i + 1])
        return dict(self.cluster.peer_addrs)

    def replace(self, slot: int) -> str:
        """Remove slot's member, wipe its data, add it back as a learner and start it; a description."""
        others = [s for s in self.client_addrs if s != slot]
        old = self.ids[slot]
        with self._client(others) as c:
            c.member_remove(old)
            deadline = time.monotonic() + REMOVE_STOP_S
            while self.procs.alive(slot) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.procs.kill(slot)  # if it did not stop (partitioned away, it may not know yet)
            shutil.rmtree(self.cluster.data_dir(slot), ignore_errors=True)
            new, members = c.member_add([self.cluster.peer_addrs[slot]], [self.client_addrs[slot]], learner=True,
                                        name=f"node{slot}")
        self.ids[slot] = new.id
        by_id = {self.ids[s]: s for s in self.client_addrs}
        seen = self._peer_addrs_seen_by(slot)
        present = [m.id for m in members]
        peers = {i: seen[by_id[i]] if i in by_id else members_addr(members, i) for i in present}
        clients = {i: self.client_addrs[by_id[i]] if i in by_id else members_addr(members, i, client=True)
                   for i in present}
        self.cluster.node_args[slot] = self.base_args[slot] + [
            "--id", str(new.id), "--initial-cluster", format_members(peers),
            "--initial-cluster-clients", format_members(clients), "--initial-cluster-state", "existing"]
        self.procs.start(slot)
        return f"member {old} of n{slot} removed, its data wiped, added back as learner {new.id}"

    def promote(self, slot: int) -> None:
        """Promote slot's learner once it has caught up (refused until then: retried)."""
        from kvstore.client import KvstoreError

        deadline = time.monotonic() + CHANGE_TIMEOUT_S
        with self._client(list(self.client_addrs)) as c:
            while True:
                try:
                    c.member_promote(self.ids[slot])
                    return
                except KvstoreError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)


def members_addr(members: list, member_id: int, client: bool = False) -> str:
    m = next(m for m in members if m.id == member_id)
    url = (m.client_urls if client else m.peer_urls)[0]
    return url.split("://", 1)[-1]


class MemberNemesis(Package):
    name = "member"
    kind = "member"

    def inject(self, ctl: Any, rng: random.Random) -> Injected:
        membership: Membership = ctl.membership
        slot = rng.choice(ctl.nodes)
        what = membership.replace(slot)
        return Injected("member", what + "; promoted at heal", [slot], lambda: membership.promote(slot))
