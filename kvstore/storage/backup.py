"""Backup files: a state machine image that carries its own checksum (like etcd's snapshot db).

A backup file is the compacted LMDB image a member streams (`Maintenance.Snapshot`)
followed by a 40-byte trailer:

    <image bytes> <magic b"KVBACKUP" (8)> <SHA-256 of the image (32)>

The trailer lets `status` and `restore` refuse a file that was truncated or
changed after it was saved without trusting anything else in it: the image
is only opened (by LMDB) once its digest matches. `save` writes to a
temporary file, checks the digest the member announced, fsyncs and renames,
so FILE either holds a whole verified backup or is not there.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lmdb

from .durable_files import fsync_dir, fsync_file
from .state_machine import SnapshotImageError, image_hash, read_image_meta

MAGIC = b"KVBACKUP"
TRAILER_SIZE = len(MAGIC) + 32
_CHUNK = 1 << 20


class BackupError(Exception):
    """A backup file is unusable (truncated, corrupted, not a backup); the message says which."""


@dataclass(frozen=True)
class BackupInfo:
    """What `kvstore snapshot status` prints."""

    index: int  # the applied log index the image holds
    term: int
    revision: int
    keys: int
    size: int  # bytes of the image (the file is TRAILER_SIZE more)
    hash: int  # hash_kv of the image: comparable with HashKV at the same revision
    sha256: str


def write_backup(path: str, chunks: Iterable[bytes],
                 expected: Callable[[], tuple[int, bytes]] | None = None) -> BackupInfo:
    """Write `chunks` as a backup file at `path`; its BackupInfo.

    `expected`, called once the chunks are exhausted, gives the (size,
    SHA-256) the sender announced at the end of its stream; a mismatch
    raises BackupError. On any error nothing is left at `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".backup-", dir=directory)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            sha = digest.digest()
            if expected is not None:
                want_size, want_sha = expected()
                if size != want_size:
                    raise BackupError(f"received {size} bytes of image; the member sent {want_size}")
                if sha != want_sha:
                    raise BackupError(f"the SHA-256 of the received image ({sha.hex()}) is not the one the "
                                      f"member computed ({want_sha.hex()})")
            f.write(MAGIC + sha)
            f.flush()
            fsync_file(f.fileno(), tmp)
        info = verify(tmp)  # a whole LMDB image, readable
        os.rename(tmp, path)
        fsync_dir(directory)
        return info
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_trailer(path: str) -> int:
    """Size of the image in `path` once its trailer and digest check out; BackupError otherwise."""
    try:
        total = os.path.getsize(path)
    except OSError as e:
        raise BackupError(f"{path}: {e.strerror}") from None
    if total <= TRAILER_SIZE:
        raise BackupError(f"{path}: {total} bytes is too short for a backup (truncated?)")
    size = total - TRAILER_SIZE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise BackupError(f"{path}: shorter than its size while reading")
            digest.update(chunk)
            left -= len(chunk)
        trailer = f.read(TRAILER_SIZE)
    if trailer[: len(MAGIC)] != MAGIC:
        raise BackupError(f"{path}: not a kvstore backup, or truncated (no {MAGIC.decode()} trailer at the end)")
    if trailer[len(MAGIC):] != digest.digest():
        raise BackupError(f"{path}: corrupted: the SHA-256 of the image ({digest.hexdigest()}) is not the one "
                          f"recorded when it was saved ({trailer[len(MAGIC):].hex()})")
    return size


def verify(path: str) -> BackupInfo:
    """Check the whole-file digest, then read the image's position and contents; BackupError if unusable."""
    size = _check_trailer(path)
    try:
        index, term, revision = read_image_meta(path)
    except SnapshotImageError as e:
        raise BackupError(str(e)) from None
    try:
        keys, h = image_hash(path)
    except lmdb.Error as e:
        raise BackupError(f"{path}: not a state machine image: {e}") from None
    with open(path, "rb") as f:
        f.seek(size + len(MAGIC))
        sha = f.read(32).hex()
    return BackupInfo(index=index, term=term, revision=revision, keys=keys, size=size, hash=h, sha256=sha)


def copy_image(path: str, dest: str) -> None:
    """Copy the image part of a verified backup to a new file `dest`, fsynced (the trailer stays behind)."""
    size = _check_trailer(path)
    with open(path, "rb") as f, open(dest, "xb") as out:
        left = size
        while left:
            chunk = f.read(min(_CHUNK, left))
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        fsync_file(out.fileno(), dest)
