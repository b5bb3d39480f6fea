"""The watch hub over a real state machine: synced delivery, slow watchers, catch-up, compaction."""
from __future__ import annotations

import asyncio

import pytest

from kvstore.server import watch_hub
from kvstore.server.watch_hub import RevisionError, Watcher, WatchHub
from kvstore.storage import history, keys
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2, kv_pb2


def put(k, v=b"v"):
    return kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=k, value=v))


def delete(k):
    return kv_pb2.RequestOp(request_delete_range=kv_pb2.DeleteRangeRequest(key=k))


class Fixture:
    def __init__(self, path):
        self.sm = StateMachine.open(path, 256 << 20, fsync=False)
        self.index = 0
        self.readable = asyncio.Event()
        self.readable.set()
        self.hub = WatchHub()
        self.hub.attach(self.sm, self.readable)

    def apply(self, *cmds, notify=True):
        batch = []
        for ops in cmds:
            self.index += 1
            batch.append((self.index, 1, command_pb2.Command(ops=ops).SerializeToString()))
        self.sm.apply(batch)
        if notify:
            self.hub.notify()

    def watcher(self, key, end=b"", start=0, **kw):
        opts = dict(prev_kv=False, no_put=False, no_delete=False, progress_notify=False)
        opts.update(kw)
        w = Watcher(1, key, end, start, wake=lambda: None, **opts)
        self.hub.add(w)
        return w

    def drain(self, w):
        """What the watcher's stream would send, catching up from history until synced and empty."""
        out = []
        while True:
            while w.pending:
                ev, _ = w.pending.popleft()
                out.append((ev.revision, ev.sub, ev.key))
            if w.synced:
                return out
            self.hub.catch_up(w)


@pytest.fixture
def fx(tmp_path):
    f = Fixture(str(tmp_path / "sm"))
    yield f
    f.sm.close()


def test_synced_watcher_gets_matching_events_once(fx):
    w = fx.watcher(b"cfg/", b"cfg0")
    assert w.synced
    fx.apply([put(b"cfg/a")], [put(b"other")], [put(b"cfg/b"), put(b"cfg/c")], [delete(b"cfg/a")])
    assert fx.drain(w) == [(1, 0, b"cfg/a"), (3, 0, b"cfg/b"), (4, 0, b"cfg/c"), (5, 0, b"cfg/a")]
    fx.hub.notify()  # nothing new: nothing again
    assert fx.drain(w) == []
    nodel = fx.watcher(b"cfg/", b"cfg0", no_delete=True)
    fx.apply([put(b"cfg/d")], [delete(b"cfg/d")])
    assert [e[2] for e in fx.drain(nodel)] == [b"cfg/d"]


@pytest.mark.parametrize("recent", [1 << 20, 2000])  # catching up from the hub's recent events, or LMDB
@pytest.mark.parametrize("page", [7, 9])  # the catch-up's last page full, or not
def test_slow_watcher_is_moved_to_catch_up_and_misses_nothing(fx, monkeypatch, page, recent):
    monkeypatch.setattr(watch_hub, "PAGE", page)
    monkeypatch.setattr(watch_hub, "RECENT_BYTES", recent)
    fx.hub.testing_max_pending = 10
    w = fx.watcher(b"k", b"l")
    fast = fx.watcher(b"k", b"l")
    expected = []
    for i in range(60):  # the slow one reads nothing meanwhile
        fx.apply([put(b"k%d" % (i % 5))])
        expected.append((i + 1, 0, b"k%d" % (i % 5)))
        fx.drain(fast)
    assert not w.synced and len(w.pending) <= 10 + page  # bounded: it was dropped from the synced set
    assert fx.hub.watcher_count == 1
    got = []
    for i in range(60, 70):  # writes go on while it catches up, and it reads ahead of the hub
        got += [(e.revision, e.sub, e.key) for e, _ in w.pending]
        w.pending.clear()
        fx.apply([put(b"k%d" % (i % 5))], [put(b"k9")], notify=False)
        expected += [(fx.sm.revision - 1, 0, b"k%d" % (i % 5)), (fx.sm.revision, 0, b"k9")]
        if not w.synced:
            fx.hub.catch_up(w)
        fx.hub.notify()
    got += fx.drain(w)
    assert w.synced
    assert got == expected


def test_apply_without_notify_then_catch_up_in_pages(fx, monkeypatch):
    """A watcher created at an old revision reads history in pages, each revision whole."""
    monkeypatch.setattr(watch_hub, "PAGE", 3)
    for i in range(10):
        fx.apply([put(b"a%d" % i), put(b"b%d" % i)] if i % 2 else [put(b"a%d" % i)])
    w = fx.watcher(b"a", b"c", start=2)
    assert not w.synced
    got = fx.drain(w)
    revs = [r for r, _, _ in got]
    assert revs == sorted(revs) and revs[0] == 2 and len(got) == len(set(got))
    assert len(got) == sum(2 if i % 2 else 1 for i in range(10)) - 1


def test_watch_from_a_compacted_revision_is_refused(fx):
    for i in range(5):
        fx.apply([put(b"k", b"%d" % i)])
    fx.sm.apply([(fx.index + 1, 1, command_pb2.Command(
        compaction=kv_pb2.CompactionRequest(revision=4)).SerializeToString())])
    fx.index += 1
    w = fx.watcher(b"k", start=2)
    with pytest.raises(RevisionError, match=history.COMPACTED):
        fx.hub.catch_up(w)
    ok = fx.watcher(b"k", start=4)
    assert [r for r, _, _ in fx.drain(ok)] == [4, 5]


def test_future_start_waits_for_its_revision(fx):
    fx.apply([put(b"k")])
    w = fx.watcher(b"k", start=4)
    assert w.synced
    for _ in range(4):
        fx.apply([put(b"k")])
    assert [r for r, _, _ in fx.drain(w)] == [4, 5]


def test_a_snapshot_install_hands_its_history_to_synced_watchers(tmp_path):
    """A member that installs an image jumps ahead: its watchers get the image's history events."""
    leader = Fixture(str(tmp_path / "leader"))
    member = Fixture(str(tmp_path / "member"))
    try:
        leader.apply([put(b"k", b"0")])
        member.apply([put(b"k", b"0")])
        w = member.watcher(b"k", b"l")
        for i in range(1, 30):
            leader.apply([put(b"k%d" % (i % 3), b"%d" % i)])
            if i % 7 == 0:
                leader.apply([delete(b"k%d" % (i % 3))])
        image = str(tmp_path / "image.mdb")
        with open(image, "wb") as f:
            leader.sm.copy_to(f.fileno())
        member.readable.clear()  # as the node does around an install
        member.sm.install_snapshot(image)
        member.hub.notify()  # refused while not readable: the install's end notifies
        assert not w.pending
        member.readable.set()
        member.hub.notify()
        expected = [(e.revision, e.sub, e.key) for e, _ in leader.sm.events(2, 1000)[0]]
        assert member.drain(w) == expected and len(expected) == 33
    finally:
        leader.sm.close()
        member.sm.close()


def test_slow_watchers_of_one_burst_catch_up_from_memory(fx, monkeypatch):
    """The hub keeps what it read (with prev records, as one watcher wants them): demoted watchers
    catch up from it, not each from LMDB, and every one gets what it asked for."""
    monkeypatch.setattr(watch_hub, "PAGE", 5)
    fx.hub.testing_max_pending = 8
    slow = [fx.watcher(b"k", b"l") for _ in range(3)]
    with_prev = fx.watcher(b"k", b"l", prev_kv=True)
    reads = []
    real_events = fx.sm.events

    def counted(start, n, prev=False):
        reads.append((start, prev))
        return real_events(start, n, prev)

    monkeypatch.setattr(fx.sm, "events", counted)
    for i in range(30):
        fx.apply([put(b"k", b"%d" % i)])
    assert all(not w.synced for w in slow)
    hub_reads = len(reads)
    got = [fx.drain(w) for w in slow]
    assert got[0] == got[1] == got[2] == [(r, 0, b"k") for r in range(1, 31)]
    assert len(reads) == hub_reads  # from memory: no LMDB read
    events = []
    while not with_prev.synced or with_prev.pending:
        while with_prev.pending:
            ev, prev = with_prev.pending.popleft()
            events.append((ev.revision, prev and keys.decode_value(prev.record)))
        if not with_prev.synced:
            fx.hub.catch_up(with_prev)
    assert events == [(1, None)] + [(r, b"%d" % (r - 2)) for r in range(2, 31)]
