"""A member's disk that can lose power: an ext4 image on a loop device.

Each disk is an image file formatted with ext4 and mounted through its own
loop device. :meth:`LoopDisk.cut` pulls the plug: the ext4 shutdown ioctl
with ``EXT4_GOING_FLAGS_NOLOGFLUSH`` stops the file system at once, without
writing back dirty pages or committing the running journal transaction, so
everything not yet fsynced (file data, new names, renames, unlinks) is gone,
as after a power cut. What was fsynced already sits in the image file. The
disk is then unmounted and its loop device detached; :meth:`LoopDisk.power_on`
attaches a fresh loop device and mounts again, which replays the journal.

Mounts live under a *root* directory that is bind-mounted onto itself and
made shared (:class:`DiskRoot`). Node processes started by ``ip netns exec``
get their own mount namespace, a slave copy of ours: with a shared parent, an
unmount here reaches their copies too, so no copy keeps the shut-down file
system alive (with a private parent it would, and the next mount would get the
dead file system back instead of replaying the journal).

Needs root, loop devices, ``mkfs.ext4``, ``losetup``, ``mount``/``umount``.
:func:`power_unsupported` says why not, for a clear skip.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

__all__ = ["DiskError", "DiskRoot", "LoopDisk", "cleanup", "drop_unsynced", "power_unsupported"]

# _IOR('X', 125, __u32) from linux/ext4.h (also include/uapi/linux/fs.h: FS_IOC_SHUTDOWN).
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2  # neither the dirty pages nor the journal are written: a power cut
IMAGE_BYTES = 2 << 30            # sparse: only what the node writes takes space
TOOLS = ("mkfs.ext4", "losetup", "mount", "umount")


class DiskError(RuntimeError):
    """A disk could not be created, mounted, cut or removed."""


def power_unsupported() -> str | None:
    """None when power cuts can be made here, else why not."""
    if os.geteuid() != 0:
        return "power cuts need root (loop devices, mount, the ext4 shutdown ioctl)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian: e2fsprogs, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    return None


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise DiskError(f"{' '.join(argv)} failed ({result.returncode}): "
                        f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def _is_mount_point(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def drop_unsynced(mount_point: str | Path) -> None:
    """Shut the ext4 file system at ``mount_point`` down now, dropping all it has not synced."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


class DiskRoot:
    """A directory bind-mounted onto itself with shared propagation, to hold disk mounts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.mounted = False

    def __enter__(self) -> DiskRoot:
        self.path.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(self.path), str(self.path)])
        self.mounted = True
        _run(["mount", "--make-shared", str(self.path)])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            _run(["umount", str(self.path)])
            self.mounted = False


class LoopDisk:
    """One ext4 image (``image``) mounted at ``mount_point`` through a loop device."""

    def __init__(self, image: str | Path, mount_point: str | Path, size: int = IMAGE_BYTES) -> None:
        self.image = Path(image)
        self.mount_point = Path(mount_point)
        self.size = size
        self.device: str | None = None
        self.cuts = 0

    @property
    def powered(self) -> bool:
        return self.device is not None

    def create(self) -> LoopDisk:
        """Make the image (sparse) and its file system, then power on."""
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        # A fresh sparse image reads as zeros, so lazy journal/inode-table init is safe and fast.
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(self.image)])
        self.power_on()
        return self

    def power_on(self) -> None:
        """Attach a new loop device and mount (ext4 replays its journal here)."""
        if self.device is not None:
            return
        self.mount_point.mkdir(parents=True, exist_ok=True)
        if _is_mount_point(self.mount_point):
            raise DiskError(f"{self.mount_point} is already a mount point")
        device = _run(["losetup", "--find", "--show", str(self.image)])
        try:
            _run(["mount", "-t", "ext4", device, str(self.mount_point)])
        except DiskError:
            _run(["losetup", "-d", device])
            raise
        self.device = device

    def cut(self) -> None:
        """Pull the plug: unsynced data and metadata are lost from this instant.

        The file system stays mounted (every access fails) until :meth:`unmount`;
        kill the processes using it in between.
        """
        if self.device is None:
            raise DiskError(f"{self.mount_point} has no power")
        drop_unsynced(self.mount_point)
        self.cuts += 1

    def unmount(self) -> None:
        """Unmount and detach (after :meth:`cut`, once no process uses the disk)."""
        if self.device is None:
            return
        _run(["umount", str(self.mount_point)])
        if _is_mount_point(self.mount_point):
            raise DiskError(f"{self.mount_point} is still mounted after umount")
        _run(["losetup", "-d", self.device])
        self.device = None


def cleanup(marker: str = "/kvj-data-") -> list[str]:
    """Unmount every disk (and disk root) whose path holds ``marker`` and detach its loop device.

    For ``kvstore jepsen cleanup`` after a run that was killed before it could
    unmount (the runner's data roots are ``$TMPDIR/kvj-data-*``).
    """
    removed = []
    # Loop devices first, while their backing files' paths still name the run: a device still
    # mounted is marked to detach itself at the unmount below.
    listing = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True).stdout
    for device in json.loads(listing or "{}").get("loopdevices", []):
        if marker in (device.get("back-file") or ""):
            subprocess.run(["losetup", "-d", device["name"]], capture_output=True)
            removed.append(f"loop device {device['name']} ({device['back-file']})")
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f if marker in line.split()[4]}
    for point in sorted(points, key=lambda p: p.count("/"), reverse=True):  # disks before their root
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        removed.append(f"mount {point}")
    return removed
