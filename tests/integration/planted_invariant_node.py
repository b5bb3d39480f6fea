"""A real node process whose Raft core breaks an invariant: for the fail-stop tests.

Run as a LocalCluster prefix:
`python planted_invariant_node.py {step|tick} python -m kvstore.server.main ARGS...`.
It is the ordinary node (`kvstore.server.main`), except that its core leaves
the log with a commit index past its last entry, as a corrupted commit index
would, so that `RaftLog.commit_to` raises its own AssertionError:

  step  while stepping the PLANT_AFTER-th AppendEntries from the leader
        (`Node.step`, called by the peer server);
  tick  in the PLANT_AFTER-th tick (`Node._tick_loop`).

The tests check that the node stops on it, with one line naming it, instead
of closing a peer connection or losing a task and going on.
"""
from __future__ import annotations

import logging
import sys

from kvstore.raft.rawnode import RawNode
from kvstore.raft.types import Message, MessageType
from kvstore.server.main import main

PLANT_AFTER = 30
_real_step = RawNode.step
_real_tick = RawNode.tick
_count = 0


def _break_commit_invariant(node: RawNode) -> None:
    logging.getLogger("kvstore.test").warning("PLANTED: breaking the commit invariant")
    node.raft.log.commit_to(node.raft.log.last_index() + 1)


def planted_step(self: RawNode, msg: Message) -> None:
    global _count
    _real_step(self, msg)
    if msg.type == MessageType.APPEND:
        _count += 1
        if _count == PLANT_AFTER:
            _break_commit_invariant(self)


def planted_tick(self: RawNode) -> None:
    global _count
    _real_tick(self)
    _count += 1
    if _count == PLANT_AFTER:
        _break_commit_invariant(self)


if __name__ == "__main__":
    where = sys.argv[1]
    if where == "step":
        RawNode.step = planted_step  # type: ignore[method-assign]
    elif where == "tick":
        RawNode.tick = planted_tick  # type: ignore[method-assign]
    else:
        sys.exit(f"planted_invariant_node: unknown place {where!r} (step or tick)")
    main(sys.argv[sys.argv.index("kvstore.server.main") + 1:])
