"""Proposals and ReadIndex batching, without a cluster."""
import asyncio
import gc

import pytest

from kvstore.server.errors import RequestFailed, leadership_lost
from kvstore.server.proposals import Proposals
from kvstore.server.read_index import ReadIndex


def test_ids_carry_member_and_are_unique():
    p = Proposals(7)
    ids = {p.next_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i >> 48 == 7 for i in ids)


def test_resolve_and_fail():
    async def main():
        p = Proposals(1)
        a, b = p.next_id(), p.next_id()
        fa = p.register(a, term=3, request_key=(9, 1))
        fb = p.register(b, term=3, request_key=(9, 2))
        p.resolve(a, (9, 1), "result-a")
        assert await fa == "result-a"
        p.resolve(b, (9, 99), "wrong request")  # same proposal id, other request: ignored
        assert not fb.done()
        p.fail_older_than(4, leadership_lost())
        with pytest.raises(RequestFailed, match="leadership lost; outcome unknown"):
            await fb
        assert len(p) == 0

    asyncio.run(main())


def test_read_index_batches_reads():
    async def main():
        asked = []
        ri = ReadIndex(asked.append, timeout_s=5, timeout_error=lambda: RequestFailed(None, "t", not_applied=True))
        ri.on_applied(10)
        r1 = ri.wait()  # nothing in flight: its confirmation starts at once
        assert len(asked) == 1
        r2, r3 = ri.wait(), ri.wait()  # arrive while the first is in flight: they share the next one
        assert len(asked) == 1
        ri.on_read_state(12, asked[0])
        assert len(asked) == 2
        assert not r1.done()  # applied 10 < read index 12
        ri.on_applied(12)
        assert await r1 == 12
        assert not r2.done()
        ri.on_read_state(13, asked[1])
        ri.on_applied(13)
        assert await r2 == 13 and await r3 == 13
        assert ri.batches_started == 2

    asyncio.run(main())


def test_read_index_fail_pending_and_timeout():
    async def main():
        asked = []
        err = RequestFailed(None, "timed out", not_applied=True)
        ri = ReadIndex(asked.append, timeout_s=0.0, timeout_error=lambda: err)
        r1 = ri.wait()
        await asyncio.sleep(0.01)
        ri.check_timeouts()
        with pytest.raises(RequestFailed, match="timed out"):
            await r1
        r2 = ri.wait()
        ri.fail_pending(leadership_lost())
        with pytest.raises(RequestFailed):
            await r2

    asyncio.run(main())


def test_read_index_fails_reads_past_their_deadline_only():
    async def main():
        asked = []
        ri = ReadIndex(asked.append, timeout_s=60, timeout_error=lambda: RequestFailed(None, "confirm timeout"),
                       deadline_error=lambda: RequestFailed(None, "read deadline", not_applied=True))
        now = asyncio.get_running_loop().time()
        late = ri.wait(deadline=now - 1)  # in flight, and its deadline has passed
        patient = ri.wait(deadline=now + 60)  # queued behind it
        forever = ri.wait()
        ri.on_applied(5)
        ri.check_timeouts()
        with pytest.raises(RequestFailed, match="read deadline"):
            await late
        assert not patient.done() and not forever.done()
        ri.on_read_state(5, asked[0])  # the failed read's confirmation still arrives: harmless
        ri.on_read_state(5, asked[1])
        assert await patient == 5 and await forever == 5
        ri.check_timeouts()
        assert ri._deadlines == []  # answered reads do not pile up

    asyncio.run(main())


def test_read_index_failing_an_abandoned_read_logs_nothing():
    """A reader whose deadline passed before its batch failed (no leader) is gone;
    the failure must not be logged as an unretrieved exception with a traceback."""
    unretrieved = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        ri = ReadIndex(lambda ctx: None, timeout_s=5, timeout_error=lambda: RequestFailed(None, "t", not_applied=True))
        fut = ri.wait()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), 0.01)  # a reader that gave up
        ri.fail_pending(leadership_lost())
        del fut
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert unretrieved == []


def test_failing_an_abandoned_proposal_logs_nothing():
    unretrieved = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        p = Proposals(1)
        fut = p.register(p.next_id(), 1, (7, 1))
        p.fail_all(leadership_lost())  # its caller had just given up
        del fut
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert unretrieved == []


def test_deadline_fails_the_waiter_outcome_unknown():
    async def main():
        p = Proposals(1)
        loop = asyncio.get_running_loop()
        late = p.register(p.next_id(), 1, (7, 1), deadline=loop.time() + 0.01)
        on_time = p.register(p.next_id(), 1, (7, 2), deadline=loop.time() + 60)
        no_deadline = p.register(p.next_id(), 1, (7, 3))
        with pytest.raises(RequestFailed, match="deadline passed") as e:
            await asyncio.wait_for(late, 2)  # the sweep, not this wait_for, ends it
        assert not e.value.not_applied and e.value.code.name == "DEADLINE_EXCEEDED"
        assert not on_time.done() and not no_deadline.done() and len(p) == 2

    asyncio.run(main())


def test_resolve_applied_answers_only_its_own_waiters():
    """From StateMachine.apply's origins: skips entries without a Command, other members'
    proposals, a reused id with another request, and callers that gave up."""
    async def main():
        p = Proposals(1)
        a, b, c = p.next_id(), p.next_id(), p.next_id()
        fa, fb = p.register(a, 1, (7, 1)), p.register(b, 1, (7, 2))
        fc = p.register(c, 1, (7, 3))
        fc.cancel()  # its RPC was cancelled
        origins = [None, (a, (7, 1)), (b, (8, 1)), (c, (7, 3)), (12345, (7, 4))]
        p.resolve_applied(origins, [None, "ra", "rb", "rc", "rx"])
        assert await fa == "ra"
        assert not fb.done() and len(p) == 1

    asyncio.run(main())


def test_failing_an_abandoned_proposal_on_deadline_logs_nothing():
    unretrieved = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        p = Proposals(1)
        fut = p.register(p.next_id(), 1, (7, 1), deadline=loop.time())
        del fut  # nobody awaits it
        await asyncio.sleep(0.1)
        assert len(p) == 0
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert unretrieved == []
