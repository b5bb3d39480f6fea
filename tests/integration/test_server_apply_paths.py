"""Both ways a member applies committed entries, on real clusters.

Usually a member applies on its event loop (`Node._apply_inline`). The apply
thread takes over for a backlog over INLINE_APPLY_MAX_BYTES (a member
catching up) and for every batch when LMDB commits are fdatasynced
(`--state-machine-sync commit`). Ordinary loads never reach those, so they
are driven here on purpose: many concurrent writers, a member far behind.
"""
from __future__ import annotations

import asyncio

from kvstore.client import AsyncClient, Client
from kvstore.launcher import LocalCluster
from kvstore.server.apply_pipeline import INLINE_APPLY_MAX_BYTES
from kvstore.v1 import kv_pb2

from server_cluster import caught_up, kv_stub, settled


def values_on(lc: LocalCluster, member: int, prefix: bytes) -> dict[bytes, bytes]:
    got = kv_stub(lc.client_addr(member)).Range(
        kv_pb2.RangeRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1]), serializable=True),
        timeout=20)
    return {x.key: x.value for x in got.kvs}


async def write_concurrently(addrs: list[str], prefix: str, writers: int, each: int) -> dict[bytes, bytes]:
    """`writers` closed-loop writers through one coalescing client: batches of many puts."""
    written: dict[bytes, bytes] = {}
    async with AsyncClient(addrs, timeout=30) as c:
        async def writer(w: int) -> None:
            for i in range(each):
                k, v = f"{prefix}/{w:03d}/{i:03d}".encode(), f"v{w}.{i}".encode() * 8
                await c.put(k, v)
                written[k] = v

        await asyncio.gather(*(writer(w) for w in range(writers)))
    return written


def test_fdatasynced_state_machine_applies_on_the_thread(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), extra_args=["--state-machine-sync", "commit"])
    lc.start()
    try:
        leader = settled(lc)
        written = asyncio.run(write_concurrently([lc.client_addr(i) for i in lc.ids], "sync", 64, 20))
        with Client([lc.client_addr(leader)], timeout=30) as c:
            assert c.get("sync/063/019").value == written[b"sync/063/019"]  # linearizable: the leader's own
        for member in lc.ids:
            caught_up(lc, member)
            assert values_on(lc, member, b"sync/") == written, f"member {member} differs"
        # a kill -9 loses nothing that was fdatasynced (nor what the WAL replays)
        lc.kill(leader)
        lc.start_node(leader)
        caught_up(lc, leader)
        assert values_on(lc, leader, b"sync/") == written
    finally:
        lc.stop()


def test_member_far_behind_applies_its_backlog_on_the_thread(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path))  # default --snapshot-count: it catches up from the log
    lc.start()
    try:
        leader = settled(lc)
        behind = next(i for i in lc.ids if i != leader)
        lc.kill(behind)
        value = b"x" * 1024
        n = 3 * INLINE_APPLY_MAX_BYTES // len(value)
        with Client([lc.client_addr(leader)], timeout=30) as c:
            for i in range(n):
                c.put(f"far/{i:05d}", value)
        lc.start_node(behind)
        st = caught_up(lc, behind)
        assert st.snapshot_index == 0, "this test means to catch up from the log, not a snapshot"
        got = values_on(lc, behind, b"far/")
        assert len(got) == n and set(got.values()) == {value}
    finally:
        lc.stop()
