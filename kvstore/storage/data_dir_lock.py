"""One process per data dir: an flock on <data dir>/LOCK, with the holder's pid in the file.

The WAL has its own lock, but it is taken deep in a node's start and says only
"open in another process". This one is taken first and names the pid, so a
second node on the same directory (a second `kvstore cluster up`, a stray
`kvstore serve`) stops with one line saying who holds it. The kernel drops the
flock when the holder exits, however it exits, so a stale file never blocks.
"""
from __future__ import annotations

import fcntl
import os

__all__ = ["DataDirInUse", "lock_data_dir", "data_dir_holder"]

LOCK_NAME = "LOCK"


class DataDirInUse(Exception):
    """Another live process holds the data dir."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"data dir {path} is in use by {who}")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None  # the holder has locked but not yet written its pid


def lock_data_dir(path: str) -> int:
    """Lock `path` (created if missing) for this process; the lock's fd, held until exit.

    Raises DataDirInUse naming the holder's pid.
    """
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise DataDirInUse(path, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def data_dir_holder(path: str) -> int | None:
    """The pid of the live process holding `path` (0 if it has not written its pid yet), else None."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None  # free: our shared lock goes with the close below
    finally:
        os.close(fd)
