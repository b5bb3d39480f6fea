"""A synchronous, hand-driven cluster for unit tests (like etcd's `network`).

Every node follows the real node-loop protocol on a MemoryStorage: send
`messages`, persist, send `persisted_messages`, apply, advance. Messages are
delivered in FIFO order by `stabilize()` until the cluster is quiet; tests
cut links with `isolate`/`cut` and filter with `drop`.
"""
from __future__ import annotations

import random
from collections import deque

from kvstore.raft import Config, MemoryStorage, Message, MessageType, RawNode, Ready, StateRole
from kvstore.raft.raft import Raft


class Cluster:
    def __init__(self, n: int = 3, seed: int = 0, ids: list[int] | None = None, **cfg) -> None:
        self.ids = ids or list(range(1, n + 1))
        self.cfg = cfg
        self.seed = seed
        self.storage = {i: MemoryStorage() for i in self.ids}
        self.nodes: dict[int, RawNode] = {}
        self.applied: dict[int, list] = {i: [] for i in self.ids}
        self.read_states: dict[int, list] = {i: [] for i in self.ids}
        self.queue: deque[Message] = deque()
        self.blocked: set[tuple[int, int]] = set()
        self.drop_types: set[MessageType] = set()
        self.delivered: list[Message] = []  # every message delivered, for assertions
        self.down: set[int] = set()
        for i in self.ids:
            self.start(i)

    def start(self, i: int, **overrides) -> RawNode:
        cfg = dict(self.cfg)
        cfg.update(overrides)
        applied = self.applied[i][-1].index if self.applied[i] else 0
        snap = self.storage[i].snapshot().metadata.index
        c = Config(id=i, peers=list(self.ids), rand=random.Random(self.seed * 1000 + i), applied=max(applied, snap), **cfg)
        self.nodes[i] = RawNode(c, self.storage[i])
        self.down.discard(i)
        return self.nodes[i]

    def crash(self, i: int) -> None:
        """Lose everything not persisted; the node is gone until start()."""
        self.nodes.pop(i, None)
        self.down.add(i)

    def raft(self, i: int) -> Raft:
        return self.nodes[i].raft

    def leader(self) -> int:
        leaders = [i for i, n in self.nodes.items() if n.raft.state == StateRole.LEADER]
        return max(leaders, key=lambda i: self.nodes[i].raft.term) if leaders else 0

    # -- driving ------------------------------------------------------------------------

    def handle_ready(self, i: int) -> Ready | None:
        node = self.nodes.get(i)
        if node is None or not node.has_ready():
            return None
        rd = node.ready()
        self.queue.extend(rd.messages)
        st = self.storage[i]
        if rd.committed_entries and rd.committed_are_durable():
            # The node loop applies these before persisting rd: they must be stored already.
            for e in rd.committed_entries:
                assert e.index <= st.last_index() and st.term(e.index) == e.term, \
                    f"member {i}: committed entry {e.index} (term {e.term}) called durable but not stored"
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        self.queue.extend(rd.persisted_messages)
        self.applied[i].extend(rd.committed_entries)
        self.read_states[i].extend(rd.read_states)
        node.advance(rd)
        if rd.committed_entries:  # applied at once here: say so, as the node's apply pipeline does
            node.advance_apply_to(rd.committed_entries[-1].index)
        return rd

    def deliver(self, m: Message) -> None:
        if m.to not in self.nodes or (m.frm, m.to) in self.blocked or m.type in self.drop_types:
            return
        self.delivered.append(m)
        self.nodes[m.to].step(m)

    def stabilize(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            progressed = False
            for i in list(self.nodes):
                if self.handle_ready(i) is not None:
                    progressed = True
            while self.queue:
                self.deliver(self.queue.popleft())
                progressed = True
                for i in list(self.nodes):
                    self.handle_ready(i)
            if not progressed:
                return
        raise AssertionError("cluster did not stabilize")

    def tick(self, i: int | None = None, n: int = 1) -> None:
        for _ in range(n):
            for j in ([i] if i is not None else list(self.nodes)):
                self.nodes[j].tick()
            self.stabilize()

    def campaign(self, i: int) -> None:
        self.nodes[i].campaign()
        self.stabilize()

    def propose(self, i: int, data: bytes) -> None:
        self.nodes[i].propose(data)
        self.stabilize()

    # -- faults ----------------------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        self.blocked.add((a, b))
        self.blocked.add((b, a))

    def isolate(self, i: int) -> None:
        for j in self.ids:
            if j != i:
                self.cut(i, j)

    def heal(self) -> None:
        self.blocked.clear()
        self.drop_types.clear()

    def applied_data(self, i: int) -> list[bytes]:
        return [e.data for e in self.applied[i] if e.data]
