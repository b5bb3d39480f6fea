"""The write-ahead log: a re-export of the native module kvstore._wal.

The format, recovery rules and failure policy are documented in
native/_wal.pyx (`help(kvstore._wal)`). Import from here so callers do not
depend on where the native code lives.
"""
from kvstore._wal import (
    HEADER_SIZE,
    Wal,
    WalCompactedError,
    WalCorruptionError,
    WalError,
    WalFsyncError,
    WalUnavailableError,
    crc32c,
)

__all__ = [
    "HEADER_SIZE",
    "Wal",
    "WalCompactedError",
    "WalCorruptionError",
    "WalError",
    "WalFsyncError",
    "WalUnavailableError",
    "crc32c",
]
