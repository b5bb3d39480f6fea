"""A node started by the launcher dies with it, even when the launcher gets no chance to clean up.

The launcher (kvstore/launcher.py) puts its pid in KVSTORE_DIE_WITH_PARENT.
The node then asks the kernel for SIGKILL when its parent goes
(PR_SET_PDEATHSIG) and, in case the parent went before that took effect,
checks that its parent is still the launcher. Done here, first thing in the
node, rather than in a preexec_fn: Python code between fork and exec in the
launcher's threaded process can crash the child. SIGKILL, not SIGTERM: it also
ends a paused (SIGSTOPped) node, and a node is built to survive kill -9.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

DIE_WITH_PARENT_ENV = "KVSTORE_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Arm the death signal if the launcher asked for it (a no-op otherwise, and off Linux)."""
    parent = os.environ.pop(DIE_WITH_PARENT_ENV, "")
    if not parent or sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the launcher died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
