"""How much of an LMDB file its data uses: the pages of its trees against the disk the file takes.

LMDB never shrinks its file: a page freed by a write is reused by a later
one, so the file's size is the high-water mark of its pages, and the disk it
takes (a sparse file, allocated ahead by the state machine) can exceed both.
The live size is what a compacted copy of the file would take: the pages of
the main tree and of every named tree, plus the two meta pages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import lmdb

__all__ = ["LmdbSpace", "lmdb_space", "allocated_bytes"]


@dataclass(frozen=True)
class LmdbSpace:
    """Bytes of one LMDB environment: on disk, up to its highest page, in its trees."""

    allocated: int  # disk the data file occupies
    high_water: int  # (last page number + 1) * page size
    live: int  # pages of every tree (what a compacted copy holds)


def lmdb_space(env_dir: str) -> LmdbSpace:
    """Measure the LMDB environment in env_dir (opened read-only; a live writer may hold it)."""
    data = os.path.join(env_dir, "data.mdb")
    allocated = os.stat(data).st_blocks * 512
    env = lmdb.open(env_dir, readonly=True, max_dbs=64, lock=True)
    try:
        psize = env.stat()["psize"]
        with env.begin() as txn:
            pages = _tree_pages(txn, env.open_db(None, txn=txn))
            names = [key for key, _ in txn.cursor()]
            for name in names:
                try:
                    db = env.open_db(name, txn=txn, create=False)
                except lmdb.Error:  # a plain key of the main tree, not a named tree
                    continue
                pages += _tree_pages(txn, db)
        high_water = (env.info()["last_pgno"] + 1) * psize
    finally:
        env.close()
    return LmdbSpace(allocated, high_water, (pages + 2) * psize)


def _tree_pages(txn: lmdb.Transaction, db: lmdb._Database) -> int:
    stat = txn.stat(db)
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def allocated_bytes(path: str) -> int:
    """Disk the files under path occupy (sparse files count what is allocated)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:  # removed while walking (a compacted WAL segment)
                pass
    return total
