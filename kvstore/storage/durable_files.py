"""Small helpers for making file-system changes durable; a failure names the file (StorageFault)."""
from __future__ import annotations

import os

from .storage_fault import failing_as

__all__ = ["fsync_dir", "fsync_file"]


def fsync_dir(path: str) -> None:
    """fsync a directory, so the entries created, renamed or removed in it survive a crash."""
    with failing_as("open", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with failing_as("fsync", path):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(fd: int, path: str) -> None:
    """fsync an open file; `path` is what a failure names."""
    with failing_as("fsync", path):
        os.fsync(fd)
