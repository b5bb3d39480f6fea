"""Snapshots: consistent LMDB images of the state machine, kept on disk.

A member's own durable base is its LMDB file (see durable_base.py); images
on disk are the ones received from a leader, kept until installed (and
`create`, for tools and tests). A leader streams its image straight from
LMDB (StateMachine.open_image), without a file.

A snapshot is two files in the store's directory, named after (term, index)
like etcd's snap files:

  <term:016x>-<index:016x>.snap   the compacted LMDB image (a plain data.mdb)
  <term:016x>-<index:016x>.meta   JSON {index, term, voters, size, crc32c}

The image is written to a temporary file, fsynced and renamed; the .meta file
is written the same way afterwards and is the commit point: a snapshot without
its .meta does not exist (it is removed as debris on open). Only the newest
`keep` snapshots are kept.

Received snapshots (streamed from a leader in chunks) go through the same
path: a `SnapshotWriter` fills a temporary file; commit() checks the size
and CRC32C the sender announced, fsyncs it, checks that the image really is
a state machine image at the announced index and term, and then publishes it
like a locally created one.

The store is used from several threads (the peer server's receive, the
node's install and cleanup): one lock serializes its directory changes.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import BinaryIO

from .direct_file import DirectFile
from .durable_files import fsync_dir, fsync_file
from .state_machine import SnapshotImageError, StateMachine, read_image_meta
from .wal import crc32c

_SNAP = ".snap"
_META = ".meta"
_TMP_PREFIX = ".tmp-"

Voters = list[int]  # a module-level name: SnapshotStore.list shadows the builtin inside the class
SnapshotInfo = tuple[int, int, Voters, str]  # (index, term, voters, path of the image)


def _name(term: int, index: int) -> str:
    return f"{term:016x}-{index:016x}"


class SnapshotStore:
    """The snapshots of one member, newest `keep` of them."""

    def __init__(self, directory: str, keep: int = 2):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.dir = directory
        self.keep = keep
        self._lock = threading.RLock()
        os.makedirs(directory, exist_ok=True)
        fsync_dir(os.path.dirname(os.path.abspath(directory)))  # the new directory's entry
        self._remove_debris()

    # ---- reading -----------------------------------------------------------

    def list(self) -> list[SnapshotInfo]:
        """Every committed snapshot as (index, term, voters, path), oldest first."""
        out = []
        with self._lock:
            for name in os.listdir(self.dir):
                if not name.endswith(_META) or name.startswith(_TMP_PREFIX):
                    continue
                with open(os.path.join(self.dir, name)) as f:
                    meta = json.load(f)
                path = os.path.join(self.dir, name[: -len(_META)] + _SNAP)
                out.append((meta["index"], meta["term"], list(meta["voters"]), path))
        out.sort()
        return out

    def latest(self) -> SnapshotInfo | None:
        """(index, term, voters, path) of the newest snapshot, or None."""
        snaps = self.list()
        return snaps[-1] if snaps else None

    def open_reader(self, index: int) -> BinaryIO:
        """The image of the snapshot at `index`, opened for streaming in chunks."""
        for i, _, _, path in self.list():
            if i == index:
                return open(path, "rb")
        raise FileNotFoundError(f"no snapshot at index {index} in {self.dir}")

    def open_image(self, index: int) -> tuple[int, int, BinaryIO]:
        """(index, term, reader) of the snapshot at `index` (a transport's SnapshotOpener)."""
        for i, term, _, path in self.list():
            if i == index:
                return i, term, open(path, "rb")
        raise FileNotFoundError(f"no snapshot at index {index} in {self.dir}")

    def remove_through(self, index: int) -> None:
        """Drop every snapshot at or below `index` (installed: the state machine is the base now)."""
        with self._lock:
            doomed = [path for i, _, _, path in self.list() if i <= index]
            for path in doomed:
                os.unlink(path[: -len(_SNAP)] + _META)  # uncommit first, then drop the image
                os.unlink(path)
            if doomed:
                fsync_dir(self.dir)

    # ---- writing -----------------------------------------------------------

    def create(self, sm: StateMachine, conf_state_voters: Voters) -> tuple[int, int, str]:
        """Snapshot `sm` at its applied index; (index, term, path of the image)."""
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_SNAP, dir=self.dir)
        try:
            index, term = sm.copy_to(fd)
            fsync_file(fd, tmp)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        existing = [s for s in self.list() if s[0] == index and s[1] == term]
        if existing:  # nothing applied since the last snapshot
            os.unlink(tmp)
            return index, term, existing[0][3]
        with open(tmp, "rb") as f:
            crc = 0
            while chunk := f.read(1 << 20):
                crc = crc32c(chunk, crc)
        return index, term, self._publish(tmp, index, term, conf_state_voters, crc)

    def receive(self, index: int, term: int, voters: Voters) -> SnapshotWriter:
        """A writer for an incoming snapshot image; commit() publishes it."""
        return SnapshotWriter(self, index, term, list(voters))

    def _publish(self, tmp_image: str, index: int, term: int, voters: Voters, crc: int) -> str:
        """Rename a synced image into place and commit it by writing its .meta."""
        with self._lock:
            base = os.path.join(self.dir, _name(term, index))
            image = base + _SNAP
            os.rename(tmp_image, image)
            meta = {"index": index, "term": term, "voters": list(voters), "size": os.path.getsize(image),
                    "crc32c": crc}
            fd, tmp_meta = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_META, dir=self.dir)
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
                f.flush()
                fsync_file(f.fileno(), tmp_meta)
            os.rename(tmp_meta, base + _META)
            fsync_dir(self.dir)
            self._prune()
            return image

    def _prune(self) -> None:
        with self._lock:
            for _, _, _, path in self.list()[: -self.keep]:
                os.unlink(path[: -len(_SNAP)] + _META)  # uncommit first, then drop the image
                os.unlink(path)
            fsync_dir(self.dir)

    def _remove_debris(self) -> None:
        """Temp files of interrupted writes, images whose .meta never landed, and .meta files
        whose image is gone (a prune whose image unlink reached the disk before the .meta's)."""
        names = set(os.listdir(self.dir))
        removed = False
        for name in names:
            stale_tmp = name.startswith(_TMP_PREFIX)
            orphan_image = name.endswith(_SNAP) and name[: -len(_SNAP)] + _META not in names
            orphan_meta = name.endswith(_META) and name[: -len(_META)] + _SNAP not in names
            if stale_tmp or orphan_image or orphan_meta:
                os.unlink(os.path.join(self.dir, name))
                removed = True
        if removed:
            fsync_dir(self.dir)


class SnapshotWriter:
    """Receives a snapshot image in chunks into a temporary file, past the page cache (direct_file.py)."""

    def __init__(self, store: SnapshotStore, index: int, term: int, voters: list[int]):
        self._store = store
        self.index, self.term, self.voters = index, term, voters
        self._fd, self._tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_SNAP, dir=store.dir)
        self._out = DirectFile(self._fd, self._tmp)
        self.size = 0
        self.crc = 0

    def write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self.size += len(chunk)
        self.crc = crc32c(chunk, self.crc)

    def commit(self, size: int, crc: int) -> str:
        """Check the sender's size and CRC32C, fsync, verify the image is at (index, term), publish;
        the image path."""
        self._out.finish()
        fsync_file(self._fd, self._tmp)
        self._close()
        try:
            if (self.size, self.crc) != (size, crc):
                raise SnapshotImageError(
                    f"received image has {self.size} bytes with CRC32C {self.crc:08x}; the sender "
                    f"sent {size} bytes with CRC32C {crc:08x}")
            index, term, _ = read_image_meta(self._tmp)
            if (index, term) != (self.index, self.term):
                raise SnapshotImageError(
                    f"received image is at index {index} term {term}, "
                    f"announced index {self.index} term {self.term}"
                )
        except BaseException:
            os.unlink(self._tmp)
            raise
        return self._store._publish(self._tmp, self.index, self.term, self.voters, self.crc)

    def abort(self) -> None:
        self._close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def _close(self) -> None:
        if self._fd >= 0:
            self._out.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
