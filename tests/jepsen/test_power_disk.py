"""The power cut really drops what was not synced, and keeps what was.

Everything else in the power tests rests on this: a loop-mounted ext4 image,
shut down with EXT4_IOC_SHUTDOWN + NOLOGFLUSH, then unmounted and mounted
again (journal replay), looks like a disk after a power cut.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.jepsen.disk import DiskRoot, LoopDisk, cleanup, power_unsupported

WHY = power_unsupported()
needs_power = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def test_without_root_a_power_run_stops_before_it_starts_and_says_why(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kvstore.jepsen.power import PowerSupply

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert power_unsupported() == "power cuts need root (loop devices, mount, the ext4 shutdown ioctl)"
    with pytest.raises(RuntimeError, match="the power nemesis cannot run here: power cuts need root"):
        PowerSupply(tmp_path, [1, 2, 3]).__enter__()
    assert not any(str(tmp_path) in line for line in open("/proc/self/mountinfo"))


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    with DiskRoot(tmp_path / "root") as root:
        d = LoopDisk(tmp_path / "disk.ext4", root.path / "disk").create()
        try:
            yield d
        finally:
            d.unmount()


def _write(path: Path, data: bytes, sync: bool, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _power_cycle(disk: LoopDisk) -> None:
    disk.cut()
    disk.unmount()
    disk.power_on()


@needs_power
def test_a_power_cut_drops_unsynced_data_and_names_and_keeps_synced_ones(disk: LoopDisk) -> None:
    mnt = disk.mount_point
    _write(mnt / "synced", b"A" * 10_000, sync=True)
    _write(mnt / "renamed.tmp", b"R" * 100, sync=True)
    _fsync_dir(mnt)
    # Nothing below is synced. (Any fsync on this file system would commit the running
    # journal transaction, and with it every earlier name and size change: ext4 journals
    # metadata for the whole file system in one transaction.)
    _write(mnt / "synced", b"B" * 5_000, sync=False, mode="ab")
    _write(mnt / "never-synced", b"D" * 10_000, sync=False)
    os.rename(mnt / "renamed.tmp", mnt / "renamed")
    time.sleep(0.2)  # time for anything the kernel writes back on its own

    _power_cycle(disk)

    assert (mnt / "synced").read_bytes() == b"A" * 10_000
    assert not (mnt / "never-synced").exists()
    assert (mnt / "renamed.tmp").exists() and not (mnt / "renamed").exists()


@needs_power
def test_another_files_fsync_can_persist_a_size_whose_data_never_made_it(disk: LoopDisk) -> None:
    """What a torn write looks like on ext4: the size grew, the new bytes read as zeros.

    The WAL's torn-tail rule (a zeroed sector marks a write that never reached
    the disk) depends on exactly this.
    """
    mnt = disk.mount_point
    _write(mnt / "log", b"A" * 10_000, sync=True)
    _fsync_dir(mnt)
    _write(mnt / "log", b"B" * 5_000, sync=False, mode="ab")
    _write(mnt / "other", b"C", sync=True)  # commits the journal, with the log's new size in it
    _power_cycle(disk)
    data = (mnt / "log").read_bytes()
    assert data[:10_000] == b"A" * 10_000
    assert set(data[10_000:]) <= {0, ord("B")}


@needs_power
def test_what_a_directory_fsync_made_durable_survives(disk: LoopDisk) -> None:
    mnt = disk.mount_point
    _write(mnt / "file", b"E" * 4096, sync=True)
    _fsync_dir(mnt)
    _power_cycle(disk)
    assert (mnt / "file").read_bytes() == b"E" * 4096


@needs_power
def test_a_process_in_another_mount_namespace_does_not_keep_the_cut_disk_alive(disk: LoopDisk) -> None:
    """Nodes under `ip netns exec` live in a slave copy of our mounts; the unmount must reach it."""
    _write(disk.mount_point / "synced", b"F", sync=True)
    _fsync_dir(disk.mount_point)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{holder.pid}/mountinfo").read_text().count(str(disk.mount_point)):
            assert time.monotonic() < deadline, "the holder never saw the disk"
            time.sleep(0.02)
        device = disk.device
        assert device is not None
        disk.cut()
        disk.unmount()
        assert str(disk.mount_point) not in Path(f"/proc/{holder.pid}/mountinfo").read_text()
        # The loop device is really free: nothing holds the shut-down file system.
        backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file")
        assert not backing.exists() or str(disk.image) not in backing.read_text()
        disk.power_on()
        assert (disk.mount_point / "synced").read_bytes() == b"F"
    finally:
        holder.kill()
        holder.wait()


@needs_power
def test_cleanup_unmounts_and_detaches_what_a_killed_run_left(tmp_path: Path) -> None:
    marker = f"/kvj-left-{os.getpid()}-{time.monotonic_ns()}"
    base = Path(str(tmp_path) + marker)
    root = DiskRoot(base).__enter__()
    disk = LoopDisk(root.path / "node1.ext4", root.path / "node1").create()  # never unmounted: "killed"
    removed = cleanup(marker)
    assert f"mount {disk.mount_point}" in removed and f"mount {root.path}" in removed
    assert any(r.startswith("loop device ") and str(disk.image) in r for r in removed), removed
    assert not any(str(disk.mount_point) in line for line in open("/proc/self/mountinfo"))
    assert cleanup(marker) == []
