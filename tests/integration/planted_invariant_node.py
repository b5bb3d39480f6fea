"""A real node process whose Raft core breaks an invariant while stepping a peer's message.

Run as a LocalCluster prefix: `python planted_invariant_node.py python -m kvstore.server.main ARGS...`.
It is the ordinary node (`kvstore.server.main`), except that the PLANT_AFTER-th
AppendEntries it steps leaves the core's log with a commit index past its last
entry, as a corrupted commit index would: `RaftLog.commit_to` raises its own
AssertionError inside `RawNode.step`. The fail-stop test checks that the node
stops on it instead of logging a closed peer connection and going on.
"""
from __future__ import annotations

import logging
import sys

from kvstore.raft.rawnode import RawNode
from kvstore.raft.types import Message, MessageType
from kvstore.server.main import main

PLANT_AFTER = 30
_real_step = RawNode.step
_appends = 0


def planted_step(self: RawNode, msg: Message) -> None:
    global _appends
    _real_step(self, msg)
    if msg.type == MessageType.APPEND:
        _appends += 1
        if _appends == PLANT_AFTER:
            logging.getLogger("kvstore.test").warning("PLANTED: breaking the commit invariant")
            self.raft.log.commit_to(self.raft.log.last_index() + 1)


if __name__ == "__main__":
    RawNode.step = planted_step  # type: ignore[method-assign]
    main(sys.argv[sys.argv.index("kvstore.server.main") + 1:])
