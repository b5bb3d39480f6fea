"""Exactly-once sessions against clocks and churn: scripted, deterministic.

A session must not expire because one leader's clock reads far ahead, and a
request of a session the table no longer holds (expired or evicted) must be
refused, never applied a second time. The teeth: the test switches
`testing_log_time_from_absolute_stamps` (log time follows the leader's clock,
as it did) and `testing_open_implicitly` (an unknown client with acked_below
<= 1 gets a new session, as it did) each make a test here fail.
"""
from __future__ import annotations

import pytest

from kvstore.storage.errors import ApplyError, ErrorCode
from kvstore.storage.log_clock import LogClock
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2

TTL_MS = 10_000
HOUR_MS = 3_600_000


def put(key: bytes) -> kv_pb2.RequestOp:
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=key, value=b"v"))


class Cluster:
    """Feeds a state machine the log a sequence of leaders would write."""

    def __init__(self, sm: StateMachine) -> None:
        self.sm = sm
        self.index = sm.applied_index
        self.term = 1
        self.clock_ms = 50_000  # the current leader's CLOCK_MONOTONIC reading

    def new_leader(self, clock_ms: int) -> None:
        self.term += 1
        self.clock_ms = clock_ms

    def propose(self, key: bytes, client: int = 0, seq: int = 0, acked: int = 0, opens: bool = False):
        cmd = command_pb2.Command(
            request_id=kv_pb2.RequestId(client_id=client, seq=seq, acked_below=acked, opens_session=opens),
            leader_clock_ms=self.clock_ms, ops=[put(key)],
        )
        self.index += 1
        return self.sm.apply([(self.index, self.term, cmd.SerializeToString())])[0]


@pytest.fixture
def sm(tmp_path):
    s = StateMachine.open(str(tmp_path / "sm"), 64 << 20, fsync=False, session_ttl_ms=TTL_MS, max_pending=8,
                          max_sessions=3)
    yield s
    s.close()


def refused(answer) -> bool:
    return (isinstance(answer, ApplyError) and answer.code is ErrorCode.FAILED_PRECONDITION
            and answer.message.startswith("session expired"))


# ---------------------------------------------------------------- the log clock


def test_log_clock_counts_one_leaders_elapsed_time_only():
    c = LogClock().advance(term=2, stamp=7_000_000)  # a first stamp only sets the baseline
    assert c == LogClock(0, 2, 7_000_000)
    c = c.advance(2, 7_000_250)
    assert c.log_time_ms == 250
    assert c.advance(2, 7_000_100) == c  # a stamp going back moves nothing
    assert c.advance(2, 0) == c  # an unstamped entry moves nothing
    c = c.advance(3, 7_000_000 + HOUR_MS)  # a new leader an hour ahead: a new baseline, no jump
    assert c.log_time_ms == 250
    assert c.advance(3, 7_000_000 + HOUR_MS + 40).log_time_ms == 290
    assert c.advance(4, 1).advance(4, 11).log_time_ms == 260  # a leader far behind: no harm either


def test_a_new_leader_whose_clock_reads_an_hour_ahead_expires_no_session(sm):
    """Client 1's seq 1 was applied, its answer lost; the next leader's clock reads +1 h.
    The retry still gets the stored answer: nothing expired, nothing applied twice."""
    c = Cluster(sm)
    first = c.propose(b"a", client=1, seq=1, acked=1, opens=True)
    c.propose(b"x", client=2, seq=1, acked=1, opens=True)
    c.new_leader(clock_ms=c.clock_ms + HOUR_MS)
    c.propose(b"x", client=2, seq=2, acked=2)
    c.clock_ms += 1_000
    again = c.propose(b"a", client=1, seq=1, acked=1)  # the retry: no longer opening
    assert again == first
    assert sm.get(b"a").version == 1 and sm.log_time_ms == 1_000
    assert set(sm.dump_sessions()) == {1, 2}


def test_teeth_log_time_following_a_leaders_clock_expires_the_session(sm):
    sm.testing_log_time_from_absolute_stamps = True
    with pytest.raises(AssertionError):
        test_a_new_leader_whose_clock_reads_an_hour_ahead_expires_no_session(sm)


def test_log_time_survives_a_reopen(tmp_path):
    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS)
    c = Cluster(sm)
    c.propose(b"a")
    c.clock_ms += 4_000
    c.propose(b"a")
    sm.close()
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS)
    c.sm = sm
    c.clock_ms += 1_000  # the same leader: counted from its last stamp before the reopen
    c.propose(b"a")
    assert sm.log_time_ms == 5_000
    sm.close()


# ---------------------------------------------------------------- refuse, never re-apply


def test_a_retry_of_seq_1_after_its_session_expired_is_refused(sm):
    """The reported double apply: seq 1 applied, answer lost, session expired (here after
    the ttl; a clock jump did the same), the retry comes with acked_below=1."""
    c = Cluster(sm)
    c.propose(b"a", client=1, seq=1, acked=1, opens=True)
    c.clock_ms += TTL_MS + 1
    c.propose(b"x")  # client 1 expires here
    assert 1 not in sm.dump_sessions()
    assert refused(c.propose(b"a", client=1, seq=1, acked=1))
    assert sm.get(b"a").version == 1 and 1 not in sm.dump_sessions()


def test_teeth_opening_sessions_implicitly_applies_the_retry_twice(sm):
    sm._sessions.testing_open_implicitly = True
    with pytest.raises(AssertionError):
        test_a_retry_of_seq_1_after_its_session_expired_is_refused(sm)


def test_only_a_first_attempt_of_seq_1_opens_a_session(sm):
    c = Cluster(sm)
    assert refused(c.propose(b"a", client=5, seq=2, acked=1, opens=True))  # opens, but not seq 1
    assert refused(c.propose(b"a", client=5, seq=1, acked=1))  # seq 1, but a retry
    assert sm.get(b"a") is None and sm.dump_sessions() == {}
    assert not isinstance(c.propose(b"a", client=5, seq=1, acked=1, opens=True), ApplyError)
    assert not isinstance(c.propose(b"a", client=5, seq=2, acked=1), ApplyError)
    assert sm.get(b"a").version == 2


# ---------------------------------------------------------------- the bound and eviction


def test_a_fourth_session_evicts_the_least_recently_used(sm):
    c = Cluster(sm)
    for client in (1, 2, 3):
        c.propose(b"k%d" % client, client=client, seq=1, acked=1, opens=True)
        c.clock_ms += 10
    c.propose(b"k1", client=1, seq=2, acked=2)  # client 1 is the most recent now
    c.clock_ms += 10
    c.propose(b"k4", client=4, seq=1, acked=1, opens=True)  # over max_sessions=3: client 2 goes
    assert set(sm.dump_sessions()) == {1, 3, 4}
    assert refused(c.propose(b"k2", client=2, seq=1, acked=1))  # its retry: refused
    assert refused(c.propose(b"k2", client=2, seq=2, acked=2))  # and anything newer
    assert sm.get(b"k2").version == 1


def test_teeth_opening_sessions_implicitly_reapplies_an_evicted_clients_retry(sm):
    sm._sessions.testing_open_implicitly = True
    with pytest.raises(AssertionError):
        test_a_fourth_session_evicts_the_least_recently_used(sm)


def _apply(tmp_path, name: str, entries, batched: bool):
    s = StateMachine.open(str(tmp_path / name), 64 << 20, fsync=False, session_ttl_ms=TTL_MS, max_pending=8,
                          max_sessions=2)
    answers = s.apply(entries) if batched else [s.apply([e])[0] for e in entries]
    state = (s.dump(), s.revision, s.log_time_ms, s.dump_sessions())
    s.close()
    return answers, state


def test_eviction_in_one_batch_is_eviction_one_by_one(tmp_path):
    """The least recently used session may be one touched earlier in the same apply batch
    (held in memory, not in the expiry index); ties of last_seen go to the smaller id."""

    def entry(i: int, client: int, seq: int, at: int) -> tuple[int, int, bytes]:
        rid = kv_pb2.RequestId(client_id=client, seq=seq, acked_below=1, opens_session=seq == 1)
        cmd = command_pb2.Command(request_id=rid, leader_clock_ms=at, ops=[put(b"k%d" % client)])
        return i, 2, cmd.SerializeToString()

    script = [(9, 1, 100), (8, 1, 100), (7, 1, 100), (8, 2, 150), (6, 1, 150), (9, 2, 160), (5, 1, 170),
              (8, 3, 170), (7, 2, 180)]
    entries = [entry(i + 1, *s) for i, s in enumerate(script)]
    one = _apply(tmp_path, "one", entries, batched=False)
    batch = _apply(tmp_path, "batch", entries, batched=True)
    assert one == batch
    answers, (_, _, _, sessions) = batch
    # 7 evicts 8 (a tie at log time 0), 6 evicts 7, 9 is touched, 5 evicts 6
    assert [refused(a) for a in answers] == [False, False, False, True, False, False, False, True, True]
    assert set(sessions) == {9, 5}


def test_a_lowered_limit_takes_effect_at_the_next_new_session(tmp_path):
    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS, max_sessions=3)
    c = Cluster(sm)
    for client in (1, 2, 3):
        c.propose(b"k", client=client, seq=1, acked=1, opens=True)
    sm.close()
    c.sm = sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS, max_sessions=1)
    c.propose(b"k", client=4, seq=1, acked=1, opens=True)
    assert set(sm.dump_sessions()) == {4}
    sm.close()


def test_a_state_machine_written_before_the_log_clock_opens_with_its_log_time(tmp_path):
    """Its metadata is (index, term, revision, log time); sessions keep their ages."""
    import struct

    import lmdb

    path = str(tmp_path / "sm")
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS)
    Cluster(sm).propose(b"a")
    sm.close()
    env = lmdb.open(str(tmp_path / "sm" / "current"), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"state", struct.pack(">QQqQ", 1, 1, 1, 1_700_000_000_000), db=meta)
    env.close()
    sm = StateMachine.open(path, 64 << 20, fsync=False, session_ttl_ms=TTL_MS)
    assert (sm.applied_index, sm.revision, sm.log_time_ms) == (1, 1, 1_700_000_000_000)
    sm.close()
