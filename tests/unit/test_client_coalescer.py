"""Coalescing: concurrent calls -> one Batch RPC, results and errors per op, caps."""
from __future__ import annotations

import asyncio

import pytest

from client_fake_cluster import FakeCluster
from kvstore.client import AsyncClient, errors
from kvstore.client.txn import Txn, put, value


def run(fc, coro_fn, **kw):
    async def main():
        async with AsyncClient(fc.endpoints, **kw) as c:
            return await coro_fn(c)

    return asyncio.run(main())


def test_concurrent_calls_become_one_batch_with_results_in_order():
    with FakeCluster() as fc:

        async def body(c):
            res = await asyncio.gather(*(c.put(f"k{i:03}", f"v{i}") for i in range(100)))
            got = await asyncio.gather(*(c.get(f"k{i:03}") for i in range(100)))
            return res, got, c.coalescer.rpcs

        res, got, rpcs = run(fc, body)
        assert fc.total_calls("Batch") == 2 and fc.total_calls("Put") == 0
        assert rpcs == 2
    assert sorted(r.revision for r in res) == list(range(1, 101))
    assert [g.value for g in got] == [f"v{i}".encode() for i in range(100)]


def test_a_lone_call_goes_out_as_its_unary_rpc():
    with FakeCluster() as fc:
        run(fc, lambda c: c.put("k", "v"))
        assert fc.total_calls("Put") == 1 and fc.total_calls("Batch") == 0


def test_per_op_errors_stay_with_their_op():
    with FakeCluster() as fc:

        async def body(c):
            return await asyncio.gather(
                c.put("good1", "v"), c.put("bad-key", "v"), c.put("good2", "v"), return_exceptions=True
            )

        res = run(fc, body)
    assert res[0].revision > 0 and res[2].revision > 0
    assert isinstance(res[1], errors.InvalidArgument) and "max key size" in str(res[1])
    assert set(fc.sm.data) == {b"good1", b"good2"}


def test_a_read_refused_per_op_for_a_passing_reason_is_retried_alone():
    with FakeCluster() as fc:

        async def body(c):
            await c.put("k", "v")
            fc.node(1).read_op_errors = 1
            return await asyncio.gather(c.get("k"), c.get("k"), c.put("bad-key", "v"), return_exceptions=True)

        res = run(fc, body)
        assert fc.node(1).calls["Range"] == 1  # the refused read, sent again on its own
    assert [r.value for r in res[:2]] == [b"v", b"v"]
    assert isinstance(res[2], errors.InvalidArgument)  # not retryable: stays an error


def test_failed_txn_compare_in_a_batch_is_a_result():
    with FakeCluster() as fc:

        async def body(c):
            await c.put("lock", "free")
            return await asyncio.gather(
                c.txn(Txn().when(value("lock") == "free").then(put("lock", "a"))),
                c.txn(Txn().when(value("lock") == "free").then(put("lock", "b"))),
            )

        first, second = run(fc, body)
    assert first.succeeded and not second.succeeded
    assert fc.sm.data[b"lock"].value == b"a"


def test_count_cap_cuts_batches():
    with FakeCluster() as fc:

        async def body(c):
            await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(250)))

        run(fc, body, max_batch_ops=100)
        sizes = [len(r.ops) for m, r in fc.node(1).requests if m == "Batch"]
    assert sorted(sizes) == [50, 100, 100]


def test_byte_cap_cuts_batches():
    with FakeCluster() as fc:

        async def body(c):
            await asyncio.gather(*(c.put(f"k{i}", b"x" * 1000) for i in range(20)))

        run(fc, body, max_batch_bytes=5000)
        sizes = [len(r.ops) for m, r in fc.node(1).requests if m == "Batch"]
    assert sum(sizes) == 20 and all(s * 1000 <= 5000 for s in sizes)


def test_an_op_that_would_overshoot_the_byte_cap_starts_a_new_batch():
    with FakeCluster() as fc:

        async def body(c):
            await asyncio.gather(*(c.put(f"k{i}", b"x" * 600) for i in range(6)))

        run(fc, body, max_batch_bytes=1300)  # two 600 B puts fit; a third would not
        sizes = [len(r.ops) for m, r in fc.node(1).requests if m == "Batch"]
    assert sizes == [2, 2, 2]


def test_coalesce_off_sends_one_unary_rpc_per_call():
    with FakeCluster() as fc:

        async def body(c):
            await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(30)))

        run(fc, body, coalesce=False)
        # (Calls started before the leader was known were redirected by followers.)
        assert fc.node(1).calls["Put"] == 30 and fc.total_calls("Batch") == 0


def test_serializable_reads_batch_separately_and_may_go_to_followers():
    with FakeCluster() as fc:

        async def body(c):
            await c.put("k", "v")
            out = await asyncio.gather(
                *(c.get("k", serializable=True) for _ in range(5)), c.put("k2", "v"), c.get("k")
            )
            return out

        out = run(fc, body, balancer="round_robin")
        batches = [(n.member_id, r) for n in fc.nodes for m, r in n.requests if m == "Batch"]
    assert [o.value for o in out[:5]] == [b"v"] * 5
    kinds = sorted(
        (tuple(sorted({op.WhichOneof("request") for op in r.ops})), all(op.request_range.serializable for op in r.ops))
        for _, r in batches
    )
    assert kinds == [(("request_put", "request_range"), False), (("request_range",), True)]


def test_calls_in_later_turns_are_not_held_back():
    """Sequential awaits each go out at once: the coalescer adds one turn, not a timer."""
    with FakeCluster() as fc:

        async def body(c):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i in range(50):
                await c.put(f"k{i}", "v")
            return loop.time() - t0

        took = run(fc, body)
        assert fc.total_calls("Put") == 50
    assert took < 5.0


def test_whole_batch_failure_reaches_every_caller():
    with FakeCluster(max_batch_ops=5) as fc:

        async def body(c):
            return await asyncio.gather(*(c.put(f"k{i}", "v") for i in range(10)), return_exceptions=True)

        res = run(fc, body)
    assert all(isinstance(r, errors.InvalidArgument) and "max_ops_per_batch" in str(r) for r in res)


def test_a_caller_timeout_does_not_break_the_batch():
    with FakeCluster() as fc:
        fc.node(1).hang = True

        async def body(c):
            return await asyncio.gather(c.put("a", "1", timeout=0.2), c.put("b", "2"), return_exceptions=True)

        res = run(fc, body, timeout=1.0)
    assert isinstance(res[0], errors.DeadlineExceeded) and res[0].maybe_applied
    assert isinstance(res[1], errors.DeadlineExceeded)


@pytest.mark.parametrize("bad", [0, -1])
def test_caps_must_be_positive(bad):
    with pytest.raises(ValueError):
        AsyncClient(["x:1"], max_batch_ops=bad)
