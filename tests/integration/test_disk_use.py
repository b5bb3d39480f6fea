"""A member's disk stays near its data under a steady overwrite load of a fixed key set.

LMDB writes every page it changes to a new place and reuses the old one once
no reader can see it. The durable base is pinned by a read transaction (see
durable_base.py), so a page freed after the base is reused only after the
next checkpoint: between two checkpoints the file grows by every page written
(about one 4 KiB page per random put, tens of MiB/s under load). The
data here is a fixed key set plus the history its overwrites leave (each
revision is kept until a compaction), so any growth of the file beyond that
data and the pages of one short checkpoint interval is waste.

One real member with the default settings: the key set is written once, then
overwritten at full speed, three times over on average. Then the LMDB file
must stay within 2.5x of its data (what a compacted copy holds), and the disk
the member's data directory takes (LMDB file, WAL, snapshots) within 1.5x of
the LMDB data plus the WAL. Measured on a shared 2-core machine: 1.09-1.30x
(the goal is 1.3x); the code before the durable base moved between
snapshots gave 2.1-3.8x (a file 2.8-9x its data, the lower figures with the
history kept).
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from kvstore.bench import LoadSpec, run_load
from kvstore.client import AsyncClient
from kvstore.launcher import LocalCluster
from kvstore.storage.space import allocated_bytes, lmdb_space

pytestmark = pytest.mark.timeout(300)

KEYS = 40_000
VALUE_BYTES = 1024  # three records a page: ~55 MiB of LMDB data
OVERWRITES = 3 * KEYS  # each key rewritten three times on average
LOAD_ROUND_S = 10.0
LOAD_MAX_S = 90.0  # a loaded machine takes longer to get the overwrites in
FILE_BOUND = 2.5
DISK_BOUND = 1.5


async def _fill(endpoint: str) -> None:
    """Write every key once (the bench's key names), 256 puts in flight."""
    value = os.urandom(VALUE_BYTES)
    async with AsyncClient([endpoint], timeout=30.0) as kv:
        for first in range(0, KEYS, 256):
            await asyncio.gather(*(kv.put(b"k%08d" % i, value) for i in range(first, min(first + 256, KEYS))))


def test_overwrites_of_a_fixed_key_set_do_not_grow_the_disk(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path / "cluster"), nodes=1)
    lc.start()
    try:
        lc.wait_for_leader(60)
        t0 = time.monotonic()
        asyncio.run(_fill(lc.client_addr(1)))
        filled_s = time.monotonic() - t0
        t1 = time.monotonic()
        ops = 0
        while ops < OVERWRITES and time.monotonic() - t1 < LOAD_MAX_S:
            stats = run_load(LoadSpec(tuple(lc.endpoints), op="put", clients=64, secs=LOAD_ROUND_S, procs=1,
                                      value_size=VALUE_BYTES, nkeys=KEYS, coalesce=True))
            assert stats.errors == 0, f"puts failed: {stats.first_error}"
            ops += stats.ops
        load_s = time.monotonic() - t1
        assert ops >= OVERWRITES, f"only {ops} overwrites in {load_s:.0f} s: too light a load to show anything"
        data_dir = lc.data_dir(1)
        lmdb_dir = os.path.join(data_dir, "db", "current")
        space = lmdb_space(lmdb_dir)
        disk = allocated_bytes(data_dir)
        wal = allocated_bytes(os.path.join(data_dir, "wal"))
    finally:
        lc.stop()
    ratio = disk / (space.live + wal)
    file_ratio = space.allocated / space.live
    print(f"\nfilled {KEYS} keys in {filled_s:.1f} s, then {ops} overwrites in {load_s:.0f} s "
          f"({ops / load_s:.0f}/s): LMDB data {space.live >> 20} MiB, file up to {space.high_water >> 20} MiB, "
          f"{space.allocated >> 20} MiB on disk ({file_ratio:.2f}x); WAL {wal >> 20} MiB; data dir {disk >> 20} MiB = "
          f"{ratio:.2f}x (LMDB data + WAL)")
    assert file_ratio <= FILE_BOUND, f"the LMDB file takes {file_ratio:.2f}x its data, more than {FILE_BOUND}x"
    assert ratio <= DISK_BOUND, f"the data dir takes {ratio:.2f}x the LMDB data + WAL, more than {DISK_BOUND}x"
