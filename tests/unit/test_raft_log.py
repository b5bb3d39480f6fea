"""RaftLog: the Storage protocol over the WAL, checked directly and against a list model."""
from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvstore.raft.storage import CompactedError, UnavailableError
from kvstore.raft.types import ConfState, Entry, EntryType, HardState, SnapshotMetadata
from kvstore.storage.raft_log import RaftLog


def data(i: int, t: int) -> bytes:
    return f"{i}@{t}".encode() * 4


def mk(lo: int, hi: int, term: int) -> list[Entry]:
    return [Entry(term, i, data=data(i, term)) for i in range(lo, hi)]


def test_fresh_log(tmp_path):
    with RaftLog.open(str(tmp_path)) as log:
        assert (log.first_index(), log.last_index(), log.term(0)) == (1, 0, 0)
        assert log.initial_state() == (HardState(), ConfState())
        assert log.snapshot().is_empty() and log.entries(1, 1) == []
        with pytest.raises(UnavailableError):
            log.term(1)
        with pytest.raises(UnavailableError):
            log.entries(1, 2)
        with pytest.raises(CompactedError):
            log.entries(0, 1)


def test_append_reopen_entry_types_and_hard_state(tmp_path):
    with RaftLog.open(str(tmp_path), 1 << 14) as log:
        log.append(mk(1, 4, 1), HardState(1, 2, 0))
        log.append([Entry(2, 4, EntryType.CONF_CHANGE, b"cc")], HardState(2, 0, 3))
    with RaftLog.open(str(tmp_path), 1 << 14) as log:
        assert log.initial_state()[0] == HardState(2, 0, 3)
        got = log.entries(1, 5)
        assert got == mk(1, 4, 1) + [Entry(2, 4, EntryType.CONF_CHANGE, b"cc")]
        assert got[3].type is EntryType.CONF_CHANGE


def test_conflicting_suffix_is_truncated_durably(tmp_path):
    with RaftLog.open(str(tmp_path), 1 << 13) as log:
        log.append(mk(1, 60, 1), HardState(1, 1, 10))
        log.append(mk(30, 35, 2), HardState(2, 3, 10))  # leader change: 30.. replaced
        assert log.last_index() == 34 and log.term(29) == 1 and log.term(30) == 2
        assert log.entries(28, 35) == mk(28, 30, 1) + mk(30, 35, 2)
        with pytest.raises(UnavailableError):
            log.term(35)
        log.append(mk(35, 37, 2))
    with RaftLog.open(str(tmp_path), 1 << 13) as log:
        assert log.last_index() == 36 and log.entries(1, 37) == mk(1, 30, 1) + mk(30, 37, 2)
        assert log.initial_state()[0] == HardState(2, 3, 10)
        with pytest.raises(ValueError):
            log.append(mk(40, 41, 2))  # a gap


def test_entries_max_bytes(tmp_path):
    with RaftLog.open(str(tmp_path)) as log:
        log.append(mk(1, 11, 1))
        size = len(data(1, 1))
        assert len(log.entries(1, 11, max_bytes=0)) == 1  # always at least one
        assert len(log.entries(1, 11, max_bytes=size * 3)) == 3
        assert len(log.entries(1, 11, max_bytes=size * 3 + 1)) == 3
        assert len(log.entries(2, 11, max_bytes=10**9)) == 9
    with RaftLog.open(str(tmp_path)) as log:  # same answers from disk instead of the cache
        assert [e.index for e in log.entries(1, 11, max_bytes=size * 4)] == [1, 2, 3, 4]


def test_snapshot_compaction_and_restart(tmp_path):
    with RaftLog.open(str(tmp_path), 1 << 13) as log:
        for b in range(40):
            log.append(mk(b * 5 + 1, b * 5 + 6, 1 + b // 20), HardState(1 + b // 20, 1, b * 5))
        before = log.wal_size()
        with pytest.raises(ValueError):
            log.compact(100)  # no snapshot yet
        meta = SnapshotMetadata(150, log.term(150), ConfState([1, 2, 3], [4]))
        log.set_snapshot(meta)
        log.compact(150)
        assert log.first_index() == 151 and log.term(150) == 2 and log.wal_size() < before
        with pytest.raises(CompactedError):
            log.term(149)
        with pytest.raises(CompactedError):
            log.entries(150, 152)
        assert log.entries(151, 153) == mk(151, 153, 2)
        with pytest.raises(ValueError):
            log.compact(160)  # beyond the snapshot
    with RaftLog.open(str(tmp_path), 1 << 13) as log:
        assert log.snapshot().metadata == SnapshotMetadata(150, 2, ConfState([1, 2, 3], [4]))
        assert log.initial_state() == (HardState(2, 1, 195), ConfState([1, 2, 3], [4]))
        assert log.term(150) == 2 and log.last_index() == 200
        assert 1 < log.first_index() <= 151  # whole segments went; a few compacted entries may remain
        assert log.entries(log.first_index(), 201) == [e for b in range(40) for e in mk(b * 5 + 1, b * 5 + 6, 1 + b // 20)][log.first_index() - 1:]


def test_set_snapshot_validates(tmp_path):
    with RaftLog.open(str(tmp_path)) as log:
        log.append(mk(1, 11, 3))
        with pytest.raises(ValueError, match="apply_snapshot"):
            log.set_snapshot(SnapshotMetadata(20, 3))
        with pytest.raises(ValueError, match="does not match"):
            log.set_snapshot(SnapshotMetadata(5, 2))
        log.set_snapshot(SnapshotMetadata(8, 3))
        with pytest.raises(ValueError, match="older"):
            log.set_snapshot(SnapshotMetadata(5, 3))


def test_apply_snapshot_discards_the_log(tmp_path):
    with RaftLog.open(str(tmp_path), 1 << 13) as log:
        log.append(mk(1, 80, 1), HardState(1, 0, 5))
        log.apply_snapshot(SnapshotMetadata(500, 7, ConfState([1, 2])))
        assert (log.first_index(), log.last_index(), log.term(500)) == (501, 500, 7)
        assert len(log._wal.segment_paths()) == 1
        log.append(mk(501, 503, 7), HardState(7, 2, 501))
    with RaftLog.open(str(tmp_path), 1 << 13) as log:
        assert (log.first_index(), log.last_index(), log.term(500)) == (501, 502, 7)
        assert log.initial_state() == (HardState(7, 2, 501), ConfState([1, 2]))
        assert log.entries(501, 503) == mk(501, 503, 7)
        with pytest.raises(CompactedError):
            log.term(499)


def test_readers_see_a_consistent_log_while_a_thread_appends_and_truncates(tmp_path):
    """The event-loop side reads while the worker thread appends, truncates and compacts."""
    log = RaftLog.open(str(tmp_path), 1 << 14)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader():
        while not stop.is_set():
            try:
                lo, hi = log.first_index(), log.last_index()
                if hi >= lo:
                    for e in log.entries(max(lo, hi - 40), hi + 1):
                        assert e.data == data(e.index, e.term)
                    log.term(hi)
            except CompactedError:
                pass  # compacted between the two calls: allowed
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    term, last = 1, 0
    for step in range(300):
        if step % 7 == 6 and last > 10:
            term += 1
            start = last - 5  # conflict
        else:
            start = last + 1
        log.append(mk(start, start + 8, term), HardState(term, 1, start))
        last = start + 7
        if step % 50 == 49:
            log.set_snapshot(SnapshotMetadata(last - 20, log.term(last - 20)))
            log.compact(last - 20)
    stop.set()
    for t in threads:
        t.join()
    log.close()
    assert not errors, errors[0]


class Model:
    """The log as a plain list, with the same index rules."""

    def __init__(self):
        self.base, self.base_term, self.ents, self.snap = 0, 0, [], None

    def term(self, i):
        return self.base_term if i == self.base else self.ents[i - self.base - 1].term

    @property
    def last(self):
        return self.base + len(self.ents)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["append", "conflict", "snap_compact", "install", "reopen"]),
                              st.integers(1, 30), st.integers(0, 300)), min_size=1, max_size=40))
def test_against_a_model(tmp_path_factory, ops):
    d = str(tmp_path_factory.mktemp("model"))
    log, m, term = RaftLog.open(d, 4096), Model(), 1
    try:
        for op, n, size in ops:
            if op == "append" or (op == "conflict" and len(m.ents) == 0):
                new = [Entry(term, i, data=bytes([i % 251]) * size) for i in range(m.last + 1, m.last + 1 + n)]
                log.append(new)
                m.ents += new
            elif op == "conflict":
                term += 1
                start = m.last - min(n, len(m.ents)) + 1
                new = [Entry(term, i, data=bytes([i % 13]) * size) for i in range(start, start + n)]
                log.append(new, HardState(term, 1, 0))
                m.ents = m.ents[: start - m.base - 1] + new
            elif op == "snap_compact" and m.ents:
                at = m.base + 1 + (size % len(m.ents))
                log.set_snapshot(SnapshotMetadata(at, m.term(at)))
                log.compact(at)
                m.base_term, m.ents, m.base = m.term(at), m.ents[at - m.base:], at
            elif op == "install":
                term += 1
                at = m.last + n
                log.apply_snapshot(SnapshotMetadata(at, term))
                m.base, m.base_term, m.ents = at, term, []
            elif op == "reopen":
                log.close()
                log = RaftLog.open(d, 4096)
            # compare: the log may keep more old entries than the model (segments go whole)
            assert log.last_index() == m.last and log.first_index() <= m.base + 1
            assert log.term(m.base) == m.base_term
            assert log.entries(m.base + 1, m.last + 1) == m.ents
    finally:
        log.close()
