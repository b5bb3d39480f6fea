"""Ctrl-C for `kvstore cluster up` alone, when a program such as make started it.

A terminal sends Ctrl-C's SIGINT to its whole foreground process group. Under
`make run` that group holds make too, and an interrupted make reports an error
and exits non-zero however cleanly the cluster stops. With `make run | tee
log`, it also kills tee, and the cluster's output then has nowhere to go.

own_foreground() moves this process into a process group of its own and makes
that group the terminal's foreground, so Ctrl-C reaches only us: we stop the
nodes and exit 0, and make exits 0 after us. The terminal goes back to the
group we came from before we return. Ctrl-Z is ignored meanwhile: a stopped
group that the shell does not know about would leave the terminal hung.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

__all__ = ["own_foreground", "in_own_foreground"]

P = ParamSpec("P")
R = TypeVar("R")


def _set_foreground(fd: int, pgrp: int) -> None:
    """tcsetpgrp from a background group: SIGTTOU (which would stop us) is blocked meanwhile."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, pgrp)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def own_foreground() -> Iterator[bool]:
    """Hold the terminal's foreground for the body; yields whether it was taken.

    Nothing to do (yields False) without a terminal on stdin, when we are not
    in its foreground group, or when we already lead our group (a shell with
    job control started us directly, so Ctrl-C reaches only us already).
    """
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
    try:
        ours = fd >= 0 and os.tcgetpgrp(fd) == os.getpgrp() != os.getpid()
    except OSError:
        ours = False
    if not ours:
        yield False
        return
    came_from = os.getpgrp()
    try:
        os.setpgid(0, 0)
        _set_foreground(fd, os.getpgrp())
    except OSError:
        with contextlib.suppress(OSError):
            os.setpgid(0, came_from)
        yield False
        return
    old_tstp = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):  # the group we came from may be gone
            _set_foreground(fd, came_from)
        signal.signal(signal.SIGTSTP, old_tstp)


def in_own_foreground(fn: Callable[P, R]) -> Callable[P, R]:
    """Run fn inside own_foreground()."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with own_foreground():
            return fn(*args, **kwargs)

    return wrapper
