"""The member set, as the state machine records it: ids, roles, addresses, and who was removed.

Kept in the state machine's meta database (so in every snapshot image) and
changed only by applying log entries, in the same LMDB transaction as the
applied index they belong to: after any crash the record is exactly the one
as of the applied index, and the Raft core restarts with its ConfState
(applied entries are not replayed to the core). A fresh state machine gets
the initial member set from the flags (`--initial-cluster`), the same on every
member of a new cluster.

Removed ids are remembered so that a member removed earlier, started again
on its old data dir, is refused rather than taken back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvstore.raft.confchange import conf_state_after
from kvstore.raft.types import ConfChange, ConfState
from kvstore.v1 import command_pb2


@dataclass(frozen=True)
class MemberInfo:
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    # set by the log (member add/update), not by a member's own flags: see MemberSet.peer_addrs
    from_log: bool = False


@dataclass(frozen=True)
class MemberSet:
    voters: tuple[int, ...]
    learners: tuple[int, ...] = ()
    info: dict[int, MemberInfo] = field(default_factory=dict)
    removed: tuple[int, ...] = ()

    @classmethod
    def initial(cls, peers: dict[int, str], clients: dict[int, str], names: dict[int, str] | None = None,
                learners: tuple[int, ...] = ()) -> MemberSet:
        names = names or {}
        info = {i: MemberInfo(names.get(i, f"node{i}"), (peers[i],), (clients[i],) if i in clients else ())
                for i in peers}
        return cls(voters=tuple(sorted(i for i in peers if i not in learners)), learners=tuple(sorted(learners)),
                   info=info)

    @property
    def ids(self) -> list[int]:
        return sorted(self.voters + self.learners)

    def conf_state(self) -> ConfState:
        return ConfState(voters=list(self.voters), learners=list(self.learners))

    def peer_addrs(self, own: dict[int, str] | None = None) -> dict[int, str]:
        """Where to reach each member's peer API. `own`: the addresses this member was started with
        (--initial-cluster); they win for the members they name until the log sets an address (a
        member reaching the others through proxies of its own, or NAT, keeps doing so)."""
        out = {}
        for i in self.ids:
            m = self.info.get(i)
            if own and i in own and (m is None or not m.from_log):
                out[i] = own[i]
            elif m is not None and m.peer_urls:
                out[i] = m.peer_urls[0]
        return out

    def client_addrs(self) -> dict[int, str]:
        return {i: self.info[i].client_urls[0] for i in self.ids if i in self.info and self.info[i].client_urls}

    def after_conf_change(self, cc: ConfChange) -> MemberSet:
        """The member set once `cc` is applied (its context, if any, is the member's MemberAttributes)."""
        cs = conf_state_after(self.conf_state(), cc)
        info = {i: m for i, m in self.info.items() if i in cs.voters or i in cs.learners}
        removed = self.removed
        if cc.change_type == ConfChange.REMOVE_NODE and cc.node_id not in removed:
            removed = tuple(sorted(removed + (cc.node_id,)))
        elif cc.context:
            a = command_pb2.MemberAttributes.FromString(cc.context)
            info[cc.node_id] = MemberInfo(a.name or f"node{cc.node_id}", tuple(a.peer_urls), tuple(a.client_urls),
                                          from_log=True)
        return MemberSet(tuple(cs.voters), tuple(cs.learners), info, removed)

    def after_update(self, member_id: int, peer_urls: list[str]) -> MemberSet:
        old = self.info.get(member_id)
        if old is None:
            return self
        info = dict(self.info)
        info[member_id] = MemberInfo(old.name, tuple(peer_urls), old.client_urls, from_log=True)
        return MemberSet(self.voters, self.learners, info, self.removed)

    def encode(self) -> bytes:
        return json.dumps({
            "voters": list(self.voters), "learners": list(self.learners), "removed": list(self.removed),
            "info": {str(i): [m.name, list(m.peer_urls), list(m.client_urls), m.from_log]
                     for i, m in self.info.items()},
        }, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> MemberSet:
        d = json.loads(raw)
        info = {int(i): MemberInfo(v[0], tuple(v[1]), tuple(v[2]), bool(v[3])) for i, v in d["info"].items()}
        return cls(tuple(d["voters"]), tuple(d["learners"]), info, tuple(d["removed"]))


def attributes(name: str, peer_urls: list[str], client_urls: list[str]) -> bytes:
    """The context of a ConfChange that adds a member."""
    return command_pb2.MemberAttributes(name=name, peer_urls=peer_urls, client_urls=client_urls).SerializeToString()
