"""Whether an LMDB file committed without fdatasync can still be trusted.

The state machine may commit its transactions without fdatasync (LMDB's
MDB_NOSYNC): the WAL is the durable record, LMDB only a materialised view of
it. A process crash (kill -9, OOM, a bug) then loses nothing: every write sits
in the kernel's page cache, which outlives the process, and LMDB is crash-safe
against process death. Only an OS crash or power loss can drop those writes,
and then in any order, so the file may be torn (a meta page on disk whose data
pages never made it).

The two cases differ by the kernel's boot id, which changes on every boot. The
guard file records the boot id before the first unsynced commit and is removed
after a full sync at a clean close. At open:

  * no guard: the last session ended with a full sync (or never wrote);
  * a guard naming this boot: the process died, the page cache did not;
  * a guard naming another boot: unsynced commits may be lost or torn, so the
    state machine is discarded and rebuilt from the newest snapshot and the
    WAL (which keeps every entry after that snapshot);
  * a condemned guard (the process stopped on a storage fault, see condemn):
    discarded and rebuilt the same way.
"""
from __future__ import annotations

import os

from .durable_files import fsync_dir, fsync_file

__all__ = ["GUARD_NAME", "boot_id", "arm", "armed", "condemn", "disarm", "survived"]

GUARD_NAME = "unsynced-since-boot"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# Tests stand in for a reboot by giving a node another boot id. Never set in production.
TESTING_BOOT_ID_ENV = "KVSTORE_TESTING_BOOT_ID"
# What a condemned guard records instead of a boot id: no boot ever matches it.
CONDEMNED = "condemned-after-a-storage-fault"


def boot_id() -> str | None:
    """This boot's id, or None where the kernel does not tell (then: sync every commit)."""
    override = os.environ.get(TESTING_BOOT_ID_ENV)
    if override:
        return override
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _path(root: str) -> str:
    return os.path.join(root, GUARD_NAME)


def survived(root: str, current_boot: str | None) -> bool:
    """False when unsynced commits under `root` were made in another boot (or one we cannot tell)."""
    try:
        with open(_path(root)) as f:
            recorded = f.read().strip()
    except FileNotFoundError:
        return True
    return recorded == current_boot


def armed(root: str) -> bool:
    """Commits under `root` may be unsynced (a guard is in place)."""
    return os.path.exists(_path(root))


def arm(root: str, current_boot: str) -> None:
    """Durably record that commits under `root` may be unsynced from now on, in this boot."""
    path = _path(root)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(current_boot + "\n")
        f.flush()
        fsync_file(f.fileno(), tmp)
    os.rename(tmp, path)
    fsync_dir(root)


def condemn(root: str) -> None:
    """Make the next open discard the state machine under `root`, in this boot too.

    Called when the process stops on a storage fault: after a failed sync the
    page cache may no longer hold what LMDB wrote (Linux drops the dirty pages
    and reports the next sync as a success), so the file cannot be trusted
    even though the machine did not reboot. The guard then names no boot.
    """
    arm(root, CONDEMNED)


def disarm(root: str) -> None:
    """Everything under `root` is on disk (the caller synced): drop the guard."""
    try:
        os.unlink(_path(root))
    except FileNotFoundError:
        return
    fsync_dir(root)
