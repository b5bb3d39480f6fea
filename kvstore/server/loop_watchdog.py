"""A member whose event loop stops turning says so, and where every thread stands.

The loop answers clients, sends heartbeats and drives Raft: blocked, it looks
to the others like a dead leader, yet the process lives and its sockets take
connections, so nothing else says what is wrong. Two signs, both in the log:

  * blocked for over BLOCKED_WARN_S (and then turning again): a WARNING line
    with how long, as etcd warns of a heartbeat sent late;
  * blocked for STACKS_AFTER_S: every thread's Python stack, written by
    faulthandler's watchdog, a C thread that needs neither the loop nor the GIL
    (so the stacks come even when some thread holds the GIL). The dump is
    faulthandler's plain text on stderr, not a log record. For C frames too,
    `py-spy dump --native --pid PID` on the live process.

A process stopped (SIGSTOP) and continued reads as blocked for as long.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
import time

log = logging.getLogger("kvstore.node")

CHECK_EVERY_S = 0.5
BLOCKED_WARN_S = 1.0
STACKS_AFTER_S = 10.0


async def watch_loop(stacks_after_s: float = STACKS_AFTER_S) -> None:
    """Run for the life of the loop: re-arm the stack dump each turn, warn of each long block."""
    try:
        while True:
            faulthandler.dump_traceback_later(stacks_after_s, file=sys.stderr)
            before = time.monotonic()
            await asyncio.sleep(CHECK_EVERY_S)
            blocked = time.monotonic() - before - CHECK_EVERY_S
            if blocked > BLOCKED_WARN_S:
                log.warning("the event loop was blocked for %.1fs (heartbeats and answers waited; "
                            "or the process was stopped)", blocked)
    finally:
        faulthandler.cancel_dump_traceback_later()
