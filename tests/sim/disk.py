"""One member's storage as the simulator sees it: what survives a crash, and what a power cut takes.

Fakes of the three interfaces the server's Ready handler, apply pipeline and
start-up reconcile use (the WAL-backed RaftLog, the LMDB StateMachine, the
SnapshotStore), with the durability rules of the real ones:

- WAL: `append` is one write and one fdatasync. A crash inside it keeps the
  whole write after a process kill (the page cache survives) and only a
  prefix of its entries, never the hard state, after a power cut (a torn
  tail is cut on recovery). An injected fsync error drops what was written
  (the kernel may have thrown the dirty pages away) and raises StorageFault.
- State machine, in boot mode (--state-machine-sync boot): applies are not
  fsynced; a power cut rolls it back to its durable base, the last
  checkpoint or installed snapshot (the boot guard's discard). An install
  follows StateMachine.install_snapshot's steps: a crash before the swap of
  `current` (a rename and a directory fsync) leaves the old state, at or
  after it the new one, durably.
- Snapshot images: published once received (file and directory fsynced
  before the message reaches Raft); `remove_through` drops them.

`Faults.point(name)` is called between the steps of each operation and may
raise Crash there: the simulator then kills the member (process or power).
"""
from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

from kvstore.raft import MemoryStorage
from kvstore.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from kvstore.storage.storage_fault import StorageFault

IMAGE = struct.Struct(">QQI")  # index, term, hash of the applied history: a state machine image
ImageInfo = tuple[int, int, list[int], str]  # (index, term, voters, path), as SnapshotStore.list gives


class Crash(Exception):
    """The member dies inside a storage call; `power`: the page cache is lost too."""

    def __init__(self, point: str, power: bool) -> None:
        super().__init__(point)
        self.point = point
        self.power = power


class Faults:
    """The seed's choices of where storage calls crash or fail."""

    def __init__(self, rng: random.Random, p_crash_fsync: float, p_crash_install: float, p_fsync_error: float,
                 p_power: float) -> None:
        self.rng = rng
        self.p_crash_fsync = p_crash_fsync
        self.p_crash_install = p_crash_install
        self.p_fsync_error = p_fsync_error
        self.p_power = p_power
        self.enabled = True  # off once the network heals: the liveness phase has no faults

    def crash(self, point: str, p: float) -> None:
        if self.enabled and p and self.rng.random() < p:
            raise Crash(point, self.rng.random() < self.p_power)


class SimLog(MemoryStorage):
    """The fake RaftLog: the Storage protocol of MemoryStorage plus the RaftLog's write side."""

    def __init__(self, disk: Disk) -> None:
        super().__init__()
        self.disk = disk

    def append(self, entries: list[Entry], hard_state: HardState | None = None) -> None:
        f = self.disk.faults
        if f.enabled and f.p_fsync_error and f.rng.random() < f.p_fsync_error:
            raise StorageFault("fdatasync", "wal/0000000000000000.wal", 5, "Input/output error")
        try:
            f.crash("wal-fdatasync", f.p_crash_fsync)
        except Crash as c:
            if c.power:
                MemoryStorage.append(self, entries[: f.rng.randint(0, len(entries))])
            else:
                self._write(entries, hard_state)
            raise
        self._write(entries, hard_state)

    def _write(self, entries: list[Entry], hard_state: HardState | None) -> None:
        MemoryStorage.append(self, entries)
        if hard_state is not None:
            self.set_hard_state(hard_state)

    def apply_snapshot(self, meta: SnapshotMetadata) -> None:  # type: ignore[override]
        """Reset the log to a snapshot whose image was received (RaftLog.apply_snapshot)."""
        self.disk.faults.crash("log-reset", self.disk.faults.p_crash_install)
        self._snapshot = Snapshot(meta, self.disk.images.data(meta.index))
        self._ents = [Entry(term=meta.term, index=meta.index)]

    def set_snapshot(self, meta: SnapshotMetadata, image: bytes) -> None:
        """A checkpoint: note the local image (RaftLog.set_snapshot); entries stay until compact."""
        self.create_snapshot(meta.index, meta.conf_state, image)

    def holds(self, index: int, term: int) -> bool:
        """Whether this durable log has entry `index` of `term`, or a snapshot base at or past it."""
        base = self.first_index() - 1
        if index <= base:
            return True
        return index <= self.last_index() and self.term(index) == term


class SimStateMachine:
    """The fake StateMachine in boot mode: a hash chain over the applied entries."""

    syncs_commits = False

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.applied_index = self.applied_term = self.hash = 0
        self.base = (0, 0, 0)  # durable: (index, term, hash) of the last checkpoint or install
        # set by the simulator: called with (index, term, data, hash) for each applied entry
        self.on_apply: Callable[[int, int, bytes, int], None] = lambda index, term, data, h: None

    def apply(self, entries, origins=None, before_commit=None) -> list:
        results: list = []
        index, term, h = self.applied_index, self.applied_term, self.hash
        for i, t, data in entries:
            if i <= index:
                results.append(None)
                if origins is not None:
                    origins.append(None)
                continue
            if i != index + 1:
                raise AssertionError(f"member {self.disk.id} applies {i} after {index}")
            h = zlib.crc32(data, zlib.crc32(b"%d:%d;" % (i, t), h))
            index, term = i, t
            self.on_apply(i, t, data, h)
            results.append(i)
            if origins is not None:
                origins.append((i, t, data) if data else None)
        if before_commit is not None:
            before_commit(results)
        self.applied_index, self.applied_term, self.hash = index, term, h
        return results

    def image(self) -> bytes:
        return IMAGE.pack(self.applied_index, self.applied_term, self.hash)

    def checkpoint(self) -> tuple[int, int]:
        self.base = (self.applied_index, self.applied_term, self.hash)
        return self.applied_index, self.applied_term

    def install_snapshot(self, path: str) -> None:
        index, term, h = IMAGE.unpack(self.disk.images.by_path(path))
        if index < self.applied_index:
            raise AssertionError(f"member {self.disk.id}: snapshot {index} is older than applied {self.applied_index}")
        f = self.disk.faults
        for step in ("copy", "verify", "rename"):
            f.crash(f"install-{step}", f.p_crash_install)
        self.applied_index, self.applied_term, self.hash = index, term, h
        self.base = (index, term, h)  # the swap: `current` renamed and the root fsynced
        f.crash("install-reopen", f.p_crash_install)

    def power_loss(self) -> None:
        """The boot guard finds an unclean shutdown and falls back to the durable base."""
        self.applied_index, self.applied_term, self.hash = self.base


class SimImages:
    """The fake SnapshotStore: received images, the newest `keep` of them."""

    def __init__(self, disk: Disk, keep: int = 2) -> None:
        self.disk = disk
        self.keep = keep
        self._images: dict[int, tuple[int, list[int], bytes]] = {}  # index -> (term, voters, image)

    @staticmethod
    def _path(index: int, term: int) -> str:
        return f"snap/{term:016x}-{index:016x}.snap"

    def publish(self, meta: SnapshotMetadata, image: bytes) -> None:
        self._images[meta.index] = (meta.term, list(meta.conf_state.voters), image)
        for index in sorted(self._images)[: -self.keep]:
            del self._images[index]

    def list(self) -> list[ImageInfo]:
        return [(i, t, v, self._path(i, t)) for i, (t, v, _) in sorted(self._images.items())]

    def latest(self) -> ImageInfo | None:
        items = self.list()
        return items[-1] if items else None

    def remove_through(self, index: int) -> None:
        self.disk.faults.crash("image-remove", self.disk.faults.p_crash_install)
        for i in [i for i in self._images if i <= index]:
            del self._images[i]

    def data(self, index: int) -> bytes:
        return self._images[index][2]

    def by_path(self, path: str) -> bytes:
        for i, (t, _v, image) in self._images.items():
            if self._path(i, t) == path:
                return image
        raise FileNotFoundError(path)


class Disk:
    """What one member has on disk; it outlives the member's processes."""

    def __init__(self, id: int, faults: Faults) -> None:
        self.id = id
        self.faults = faults
        self.images = SimImages(self)
        self.wal = SimLog(self)
        self.sm = SimStateMachine(self)

    def conf_state(self) -> ConfState:
        return self.wal.snapshot().metadata.conf_state
