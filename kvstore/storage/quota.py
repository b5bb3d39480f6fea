"""The space quota (etcd's --quota-backend-bytes): what adds data, and how much space is in use.

Space in use is the LMDB pages that hold data (every sub-database's branch,
leaf and overflow pages, plus the two meta pages), not the file's size: LMDB
puts the pages a delete or a compaction frees on its free list and reuses
them for later writes, so the file never shrinks but its free pages are room
to write. A store past its quota therefore takes writes again as soon as
deletes and a compaction have freed pages, with no defragmentation.
`kvstore defrag` (a compacted copy) is only needed to give the disk back to
the filesystem. Pages freed while an older read transaction still sees them
(a snapshot being streamed, the pinned durable base of the last checkpoint)
become reusable once it ends; in-use counts them as free already, so the
file may run past the quota by what was freed since the last checkpoint.

Refused past the quota (RESOURCE_EXHAUSTED): a command with a put anywhere
in it. Deletes, compactions, reads and internal commands still run.
"""
from __future__ import annotations

from kvstore.v1 import command_pb2

from .errors import NO_SPACE

__all__ = ["adds_data", "command_adds_data", "used_bytes", "DEFAULT_QUOTA_BYTES", "MAX_QUOTA_BYTES",
           "map_size_for", "map_nearly_full", "space_exceeded", "map_exceeded"]

DEFAULT_QUOTA_BYTES = 2 << 30  # etcd's default
MAX_QUOTA_BYTES = 8 << 30  # etcd's suggested maximum


def map_size_for(quota: int) -> int:
    """The LMDB map for a quota: twice it, at least 8 GiB.

    The file runs past the space in use by the pages freed while a read
    transaction still saw them (see above), so a map only as large as the
    quota fills (MDB_MAP_FULL, every member at once) while the quota is still
    met. The map is address space, not disk: the file is sparse past its
    last page."""
    return max(8 << 30, 2 * (quota or DEFAULT_QUOTA_BYTES))


def map_nearly_full(file_bytes: int, map_size: int) -> bool:
    """The second brake: the file's last page is within an eighth of the map.

    Past this, writes that add data are refused like past the quota, so that
    deletes and compactions (which copy pages too) still have room, and the
    store never dies of MDB_MAP_FULL."""
    return file_bytes >= map_size - map_size // 8


def adds_data(ops) -> bool:
    """Whether any of the ops (RequestOps, recursively through txns) is a put."""
    for op in ops:
        kind = op.WhichOneof("request")
        if kind == "request_put":
            return True
        if kind == "request_txn" and (adds_data(op.request_txn.success) or adds_data(op.request_txn.failure)):
            return True
    return False


def command_adds_data(cmd: command_pb2.Command) -> bool:
    return adds_data(cmd.ops)


def used_bytes(env, txn, dbs) -> int:
    """Bytes of the pages holding data in `txn`'s view: every db in `dbs` and the main db, and the meta pages."""
    def pages(st: dict) -> int:
        return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]

    n = 2 + pages(env.stat())  # the meta pages and the main db (which names the others)
    for db in dbs:
        n += pages(txn.stat(db))
    return n * env.stat()["psize"]


def space_exceeded(quota: int, used: int) -> str:
    """The refusal's message: names the quota and the size in use."""
    return (f"{NO_SPACE}: {used} bytes in use of the {quota}-byte quota (--quota-backend-bytes); "
            "delete keys and compact the history to free space")


def map_exceeded(file_bytes: int, map_size: int) -> str:
    """The refusal's message when the file, not the data, has run out of room."""
    return (f"{NO_SPACE}: the LMDB file has grown to {file_bytes} bytes of its {map_size}-byte map "
            "(pages freed while a snapshot or checkpoint held them); delete keys and compact the history, "
            "then restore a `snapshot save` image to shrink the file")

