"""Exactly-once against a real leader whose wall clock jumps an hour, and against eviction.

The members run with the clock shim (kvstore.jepsen.clock.NodeClocks), so the
leader's CLOCK_REALTIME really jumps while it runs. A client's seq 1 is
applied, its reply lost; the leader's clock jumps +1 h; another client
writes (log time moves on); the first client's retry must get the original
answer. The teeth: with --testing-wall-clock-sessions (expiry follows the
leader's wall clock, as it did) the same retry finds its session expired.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvstore.client import Client, errors
from kvstore.jepsen.clock import NodeClocks, compiler
from kvstore.launcher import LocalCluster
from server_cluster import settled

pytestmark = pytest.mark.timeout(120)

needs_shim = pytest.mark.skipif(compiler() is None, reason="no C compiler to build the clock shim")


def _cluster(tmp_path: Path, *args: str, clocks: bool = True) -> tuple[LocalCluster, NodeClocks | None]:
    node_clocks = NodeClocks(tmp_path / "clocks", [1, 2, 3]) if clocks else None
    lc = LocalCluster.with_free_ports(
        str(tmp_path / "cluster"), extra_args=list(args),
        node_env={n: node_clocks.env(n) for n in (1, 2, 3)} if node_clocks else None,
    )
    lc.start()
    return lc, node_clocks


def _leader_jumps_while_the_reply_is_lost(lc: LocalCluster, clocks: NodeClocks):
    """Client A's first put is applied and its reply dropped; meanwhile the leader's wall
    clock jumps +1 h and client B writes. Returns A's put result (after its retry) and A."""
    leader = settled(lc)
    other = Client(lc.endpoints, timeout=20)
    other.put("b", "before")
    dropped: list[int] = []

    def jump_then_lose_the_reply(method: str, request) -> bool:
        if dropped or request.request_id.seq != 1:
            return False
        dropped.append(request.request_id.seq)
        clocks.set(leader, 3600)
        time.sleep(2.5)  # the shim reads the offset within a second
        with Client(lc.endpoints, timeout=20) as late:  # a new client: its own session opens
            late.put("b", "after the jump")  # log time moves on under the skewed leader
        return True

    a = Client(lc.endpoints, timeout=20, coalesce=False, testing_drop_reply_after_send=jump_then_lose_the_reply)
    try:
        return a.put("a", "once"), a, other, dropped
    except BaseException:
        a.close()
        other.close()
        raise


@needs_shim
def test_a_leaders_wall_clock_an_hour_ahead_expires_no_session(tmp_path):
    lc, clocks = _cluster(tmp_path)
    try:
        result, a, other, dropped = _leader_jumps_while_the_reply_is_lost(lc, clocks)
        with a, other:
            assert dropped == [1]
            kv = a.get("a").kv
            assert (kv.value, kv.version, kv.mod_revision) == (b"once", 1, result.revision)  # applied once
            a.put("a", "twice")  # the session lives on
            assert a.get("a").kv.version == 2
        assert lc.leader() is not None
    finally:
        lc.stop()


@needs_shim
def test_teeth_with_wall_clock_expiry_the_jump_expires_the_session(tmp_path):
    lc, clocks = _cluster(tmp_path, "--testing-wall-clock-sessions")
    try:
        with pytest.raises(errors.SessionExpired) as e:
            _leader_jumps_while_the_reply_is_lost(lc, clocks)
        assert e.value.maybe_applied  # the lost first attempt was applied: the outcome is unknown
        with Client(lc.endpoints, timeout=20) as c:
            assert c.get("a").kv.version == 1  # refused, not applied a second time
    finally:
        lc.stop()


def test_an_evicted_client_is_refused_typed_and_moves_on_to_a_new_session(tmp_path):
    lc, _ = _cluster(tmp_path, "--max-sessions", "2", clocks=False)
    try:
        settled(lc)
        with Client(lc.endpoints, timeout=20) as a, Client(lc.endpoints, timeout=20) as b, \
                Client(lc.endpoints, timeout=20) as c:
            a.put("k", "a")
            b.put("k", "b")
            c.put("k", "c")  # a third session: a's, the least recently used, is evicted
            first_id = a.async_client.session.client_id
            with pytest.raises(errors.SessionExpired) as e:
                a.put("k", "a again")
            assert isinstance(e.value, errors.FailedPrecondition)
            assert "session expired" in str(e.value) and str(first_id) in str(e.value)
            assert c.get("k").kv.value == b"c"  # the refused put was not applied
            a.put("k", "a in a new session")  # no retry storm: the client moved on
            assert a.async_client.session.client_id != first_id
            assert c.get("k").kv.value == b"a in a new session"
    finally:
        lc.stop()
