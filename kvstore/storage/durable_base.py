"""The durable base: the LMDB file's last synced state, restorable after an OS crash.

The WAL is compacted behind the state machine itself (as etcd compacts behind
its backend's consistent index), not behind a full copy of it. With
`--state-machine-sync boot` LMDB commits are not synced, and an OS crash may
leave the file torn. So a checkpoint (StateMachine.checkpoint) makes one
committed LMDB transaction T the durable base:

  1. with LMDB's write lock held (no commit in between), pin T with a read
     transaction and copy the file's two meta pages, the roots of T's tree;
  2. env.sync(): every page of T (and of anything committed since) is on
     disk; this costs the dirty pages, not the size of the database;
  3. save the meta pages and T's (applied index, term) here, fsynced, renamed
     into place, directory fsynced; only then release the previous pin.

Why T survives an OS crash although later commits are unsynced: LMDB never
writes a page that a live reader can see. A page of T's tree is freed only by
a later transaction, and a page freed by transaction X is reused only once no
reader older than X is left; the pin at T is that reader. So until the next
checkpoint's base is durable, no page of T's tree is overwritten, in memory or
on disk, whatever the page cache writes back. Only the meta pages, which
later commits do overwrite, can be wrong after the crash, and their content
at T is saved here. Restoring it (write both meta pages back, fsync) turns
the file into exactly T. Pages allocated after T are unreferenced by T.

What the WAL may drop (the node's rule): nothing past the base's applied
index. After an OS crash the boot guard restores the base instead of
discarding the state machine, and the WAL replays from base + 1. After a
process crash the page cache survived, so the file is intact and newer; but
its pin is gone, so every open takes a fresh checkpoint before the first new
commit. The pin costs space: a page freed after the base is reused only once
the next base is saved, and a random put frees about one 4 KiB page. So the
node checkpoints every fraction of a second while writes go on (not per
--snapshot-count entries, which let the file grow by GiBs), and each
checkpoint syncs once before its pin and once after, so that the pin is held
for little more than the second, short sync.

File layout: magic, applied index, applied term, page size, the two meta
pages, CRC32C of all before it.
"""
from __future__ import annotations

import os
import struct

from .durable_files import fsync_dir, fsync_file
from .storage_fault import failing_as
from .wal import crc32c

__all__ = ["BASE_NAME", "DurableBaseError", "save", "load", "restore"]

BASE_NAME = "synced-base"
DATA_FILE = "data.mdb"
_MAGIC = b"KVBASE01"
_HEADER = struct.Struct(">8sQQI")
_CRC = struct.Struct(">I")


class DurableBaseError(Exception):
    """The saved base is unreadable: the state machine cannot be restored from it."""


def save(gen_dir: str, index: int, term: int, psize: int, meta_pages: bytes) -> None:
    """Durably record the base (index, term, meta pages) of the LMDB environment in gen_dir."""
    if len(meta_pages) != 2 * psize:
        raise ValueError(f"need the two meta pages ({2 * psize} bytes), got {len(meta_pages)}")
    body = _HEADER.pack(_MAGIC, index, term, psize) + meta_pages
    path = os.path.join(gen_dir, BASE_NAME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(body + _CRC.pack(crc32c(body)))
        f.flush()
        fsync_file(f.fileno(), tmp)
    os.rename(tmp, path)
    fsync_dir(gen_dir)


def load(gen_dir: str) -> tuple[int, int, int, bytes] | None:
    """(index, term, page size, meta pages) of the saved base, None if there is none."""
    path = os.path.join(gen_dir, BASE_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    if len(raw) < _HEADER.size + _CRC.size or crc32c(raw[:-_CRC.size]) != _CRC.unpack(raw[-_CRC.size:])[0]:
        raise DurableBaseError(f"{path}: checksum mismatch or truncated")
    magic, index, term, psize = _HEADER.unpack_from(raw)
    pages = raw[_HEADER.size:-_CRC.size]
    if magic != _MAGIC or len(pages) != 2 * psize:
        raise DurableBaseError(f"{path}: not a durable base file")
    return index, term, psize, pages


def restore(gen_dir: str) -> tuple[int, int] | None:
    """Roll gen_dir's LMDB file back to its saved base; its (index, term), or None without a base."""
    base = load(gen_dir)
    if base is None:
        return None
    index, term, _psize, pages = base
    data = os.path.join(gen_dir, DATA_FILE)
    with failing_as("open", data):
        fd = os.open(data, os.O_WRONLY)
    try:
        with failing_as("pwrite", data):
            if os.pwrite(fd, pages, 0) != len(pages):
                raise DurableBaseError(f"{data}: short write restoring the meta pages")
        fsync_file(fd, data)
    finally:
        os.close(fd)
    return index, term
