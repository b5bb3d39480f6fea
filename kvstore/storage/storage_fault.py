"""A storage call that failed, named by its operation and file: the node must stop.

After a failed fsync, fdatasync or msync the kernel may already have dropped
the dirty pages and will report success next time, so the only safe answer is
to stop and rebuild from what is known to be durable (see server/supervisor.py).
The exception names what failed so the one line the node prints before it exits
says where to look: ``fsync /data/snap: [Errno 5] Input/output error``.
"""
from __future__ import annotations

import errno as errno_codes
import os
from contextlib import contextmanager
from collections.abc import Iterator

import lmdb

__all__ = ["StorageFault", "failing_as"]


class StorageFault(OSError):
    """`operation` on `filename` failed; str() is '<operation> <file>: [Errno N] <reason>'."""

    def __init__(self, operation: str, path: str, err: int | None, reason: str) -> None:
        super().__init__(err, reason, path)
        self.operation = operation

    def __str__(self) -> str:
        code = f"[Errno {self.errno}] " if self.errno else ""
        return f"{self.operation} {self.filename}: {code}{self.strerror}"


def _errno_of_lmdb(e: lmdb.Error) -> int | None:
    """LMDB reports a system error as 'mdb_call: <strerror>'; recover the errno from the text."""
    text = str(e)
    for code in errno_codes.errorcode:
        if text.endswith(os.strerror(code)):
            return code
    return None


@contextmanager
def failing_as(operation: str, path: str) -> Iterator[None]:
    """Turn an OSError or LMDB error raised inside into a StorageFault naming `operation` and `path`."""
    try:
        yield
    except StorageFault:
        raise
    except OSError as e:
        raise StorageFault(operation, path, e.errno, e.strerror or str(e)) from e
    except lmdb.Error as e:
        code = _errno_of_lmdb(e)
        call = str(e).split(":", 1)[0]
        reason = f"{os.strerror(code)} ({call})" if code else str(e)
        raise StorageFault(operation, path, code, reason) from e
