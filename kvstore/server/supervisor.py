"""The one place a node process goes to die: fail-stop for every loop, task and thread.

A node that hits a storage fault or a broken invariant can no longer keep its
promises: after a failed fsync the kernel may have dropped the dirty pages and
will call the next fsync a success, and a Raft core that raised half way
through a step holds half-changed state. Going on (serving reads, syncing
LMDB at close, clearing the boot guard) is how acknowledged writes get lost.
So whoever sees such a failure calls `fatal`, which

  * logs ONE line naming the operation and the file, e.g.
    ``FATAL: fdatasync /data/wal/0000000000000001.wal: [Errno 5] Input/output error (in the Ready loop)``,
  * runs the hooks registered with `on_fatal`, for at most HOOK_TIMEOUT_S
    (the node condemns its boot guard there, so the next start rebuilds the
    state machine from the newest snapshot and the WAL instead of trusting
    LMDB),
  * and ends the process at once with EXIT_CODE (os._exit: no cleanup code
    runs, nothing is synced or retried).

The event-loop side reports through `watch` (a task that ends with an
exception) and explicit `fatal` calls in the loops; the worker threads run
their calls through `guarded`. It is process-wide on purpose: one process,
one way to stop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from typing import BinaryIO, NoReturn, TypeVar
from collections.abc import Callable

from kvstore.raft.types import ConfState
from kvstore.storage.storage_fault import failing_as

__all__ = ["EXIT_CODE", "SupervisedReader", "describe", "fatal", "guarded", "on_fatal", "watch"]

log = logging.getLogger("kvstore.node")

EXIT_CODE = 70  # EX_SOFTWARE
HOOK_TIMEOUT_S = 1.0  # the process exits within this of the failure, whatever the hooks do
T = TypeVar("T")
F = TypeVar("F", bound=asyncio.Future)

_ending = threading.Lock()
_hooks: list[Callable[[], None]] = []


def on_fatal(hook: Callable[[], None]) -> None:
    """Run `hook` on the fatal path after the line is logged (best effort: errors ignored, time bounded)."""
    _hooks.append(hook)


def describe(where: str, exc: BaseException | None) -> str:
    """One line: the failed operation and its file, or for a bug the exception and the code that raised it."""
    if exc is None:
        text = where
    elif isinstance(exc, OSError) and getattr(exc, "operation", None) and exc.filename:
        text = f"{exc} (in {where})"  # StorageFault, WalFsyncError: '<operation> <file>: [Errno N] ...'
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{where} {exc.filename}: [Errno {exc.errno}] {exc.strerror}"
    else:
        text = f"{where}: {type(exc).__name__}: {exc} (raised at {_origin(exc)})"
    return " ".join(text.split())  # one line, whatever the message held


def _origin(exc: BaseException) -> str:
    """file:line of the innermost frame that raised `exc`."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}"


def fatal(where: str, exc: BaseException | None = None) -> NoReturn:
    """Log one line naming what failed and where, then end the process now. Safe from any thread."""
    if not _ending.acquire(blocking=False):
        while True:  # another thread is ending the process; its line is the one that counts
            time.sleep(1)
    try:
        log.critical("FATAL: %s", describe(where, exc))
        if exc is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("traceback of the fatal error:\n%s", "".join(traceback.format_exception(exc)))
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        # The hooks write to a disk that just failed: give them HOOK_TIMEOUT_S, never more.
        runner = threading.Thread(target=_run_hooks, name="fatal-hooks", daemon=True)
        runner.start()
        runner.join(HOOK_TIMEOUT_S)
    finally:
        os._exit(EXIT_CODE)


def _run_hooks() -> None:
    for hook in _hooks:
        try:
            hook()
        except BaseException:
            pass  # the process ends anyway; the FATAL line says why


def watch(task: F, where: str) -> F:
    """A task (or future) that ends with an exception ends the process; cancellation is a clean stop."""
    def done(t: asyncio.Future) -> None:
        if not t.cancelled() and t.exception() is not None:
            fatal(where, t.exception())
    task.add_done_callback(done)
    return task


def guarded(where: str, fn: Callable[..., T], *args: object) -> Callable[[], T]:
    """`fn(*args)` for a worker thread: an exception ends the process right there, not later on the loop."""
    def run() -> T:
        try:
            return fn(*args)
        except BaseException as e:
            fatal(where, e)
    return run


class SupervisedReader:
    """A file opened for reading whose read errors end the process (a snapshot image being sent)."""

    def __init__(self, f: BinaryIO, where: str, conf_state: ConfState | None = None) -> None:
        self._f = f
        self._where = where
        self.conf_state = conf_state  # the membership the image holds (a snapshot's metadata must say it)

    def read(self, n: int = -1) -> bytes:
        try:
            with failing_as("read", str(getattr(self._f, "name", "?"))):
                return self._f.read(n)
        except Exception as e:
            fatal(self._where, e)

    def close(self) -> None:
        self._f.close()
