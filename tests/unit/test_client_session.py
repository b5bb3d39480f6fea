"""Session numbering and acked_below, alone and as seen on the wire."""
from __future__ import annotations

import asyncio

import pytest

from client_fake_cluster import FakeCluster
from kvstore.client import AsyncClient
from kvstore.client.session import Session, new_client_id


def test_client_ids_are_random_nonzero_63_bit():
    ids = {new_client_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(0 < i < 1 << 63 for i in ids)
    with pytest.raises(ValueError):
        Session(0)
    with pytest.raises(ValueError):
        Session(1 << 63)


def test_seq_increments_and_acked_below_follows_in_order_completion():
    s = Session(5)
    assert s.acked_below == 1
    a, b, c = s.begin(), s.begin(), s.begin()
    assert (a, b, c) == (1, 2, 3)
    assert s.acked_below == 1
    s.finish(a)
    assert s.acked_below == 2
    s.finish(b)
    s.finish(c)
    assert s.acked_below == 4 == s.next_seq  # nothing outstanding


def test_acked_below_waits_for_the_oldest_outstanding_request():
    s = Session(5)
    seqs = [s.begin() for _ in range(5)]  # 1..5 in flight
    s.finish(2)
    s.finish(4)
    assert s.acked_below == 1  # 1 is still owed
    s.finish(1)
    assert s.acked_below == 3  # 2 done, 3 owed
    s.finish(5)
    assert s.acked_below == 3
    s.finish(3)
    assert s.acked_below == 6
    assert s.outstanding == 0
    s.finish(3)  # a second finish is harmless
    assert s.acked_below == 6 and seqs == [1, 2, 3, 4, 5]


def test_request_ids_on_the_wire():
    """Each mutation gets the next seq; acked_below never passes an unanswered seq."""
    with FakeCluster() as fc:

        async def main():
            async with AsyncClient(fc.endpoints, coalesce=False, client_id=77) as c:
                await c.put("a", "1")
                await c.put("b", "2")
                await c.get("a")  # reads take no seq
                await asyncio.gather(c.put("c", "3"), c.delete("a"), c.put("d", "4"))
                await c.put("e", "5")

        asyncio.run(main())
        muts = [r for m, r in fc.node(1).requests if m != "Range"]
    rids = [(r.request_id.client_id, r.request_id.seq, r.request_id.acked_below) for r in muts]
    assert [cid for cid, _, _ in rids] == [77] * 6
    assert [seq for _, seq, _ in rids[:2]] == [1, 2]
    assert rids[0][2] == 1 and rids[1][2] == 2
    assert sorted(seq for _, seq, _ in rids[2:5]) == [3, 4, 5]
    assert all(ab <= 3 for _, _, ab in rids[2:5])  # the three were in flight together
    assert rids[5][1:] == (6, 6)


def test_coalesced_batch_uses_one_request_id():
    with FakeCluster() as fc:

        async def main():
            async with AsyncClient(fc.endpoints, client_id=9) as c:
                await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(10)))
                await asyncio.gather(*(c.put(f"j{i}", "v") for i in range(10)))

        asyncio.run(main())
        batches = [r for m, r in fc.node(1).requests if m == "Batch"]
    assert [len(b.ops) for b in batches] == [10, 10]
    assert [(b.request_id.seq, b.request_id.acked_below) for b in batches] == [(1, 1), (2, 2)]
    assert all(not op.request_put.HasField("request_id") for b in batches for op in b.ops)
