"""`kvstore wal repair`: the operator's way past a torn last WAL write the node refuses.

A power cut during a batch's fdatasync can persist later sectors of that
batch but not earlier ones. The batch was never acknowledged (nothing is
answered, voted or sent as persisted before its fdatasync returns), but at
start the WAL sees a bad record followed by good ones, which is also what
damage to acknowledged records looks like, so the node refuses to start and
names this command (see Recovery rules in native/_wal.pyx).

The repair cuts the last segment at that bad record and prints what it
dropped, so the operator can judge. It cannot prove from the disk that the
dropped records were never acknowledged (nothing on disk marks where the last
completed fdatasync ended); run it after a power loss, not after damage found
any other way. It refuses when the log would then end below the commit index
its surviving hard state records, which no torn last write leaves.
"""
from __future__ import annotations

import os

from kvstore.storage.wal import Wal

__all__ = ["describe", "repair", "repair_hint"]


def repair_hint(data_dir: str) -> str:
    """The sentence a refusing node logs (one source for the command's spelling)."""
    return (f"if this member lost power, this can be a torn last write that was never acknowledged: "
            f"`kvstore wal repair --data-dir {data_dir}` cuts the log there and says what it drops "
            f"(it refuses if committed entries would go)")


def repair(data_dir: str) -> dict | None:
    """Cut the WAL under `data_dir` at its refused tail; what was dropped, or None if it opens cleanly."""
    path = os.path.join(data_dir, "wal")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no WAL at {path}")
    # The smallest segment size: the repair must not grow the last segment's preallocation.
    wal = Wal(path, 4096, repair_tail=True)
    try:
        return wal.repaired
    finally:
        wal.close()


def describe(dropped: dict) -> str:
    """One line for the operator."""
    what = f"{dropped['entries_after']} intact entries"
    if dropped["dropped_through"] is not None:
        what += f" (up to index {dropped['dropped_through']})"
    return (f"repaired {dropped['path']}: cut at offset {dropped['offset']} ({dropped['reason']}); dropped "
            f"{dropped['bytes']} bytes: the damaged record, {what} and {dropped['other_records_after']} other "
            f"records after it; the log now ends at entry {dropped['last_index']}")
