"""The Ready handler and the apply pipeline, driven by hand on real storage (native WAL, LMDB, snapshot store).

Each test takes Readys from a real RawNode, runs the steps the handler
yields as node.py does (synchronously here), and checks the decisions: what
is sent before and after the fsync, what is written, which committed entries
are applied before this Ready's write and which after it, when waiters are
answered and when the core learns the applied index.
"""
from __future__ import annotations

import os
import random

import pytest

from kvstore.raft import Config, RawNode, faults
from kvstore.raft.types import ConfChange, ConfState, Entry, EntryType, Message, MessageType, SnapshotMetadata
from kvstore.server.apply_pipeline import ApplyPipeline, RecordConfState
from kvstore.server.ready_handler import ReadyHandler, Step, Write
from kvstore.storage.raft_log import RaftLog
from kvstore.storage.snapshot import SnapshotStore
from kvstore.storage.state_machine import StateMachine
from kvstore.storage.storage_fault import StorageFault
from kvstore.storage.wal import crc32c
from kvstore.v1 import command_pb2, kv_pb2


def put_cmd(key: bytes, value: bytes, pid: int = 0) -> bytes:
    op = kv_pb2.RequestOp(request_put=kv_pb2.PutRequest(key=key, value=value))
    return command_pb2.Command(ops=[op], leader_clock_ms=1_000, proposal_id=pid).SerializeToString()


class Events:
    """Records what the handler and the pipeline tell the node, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_hard_state(self, hs) -> None:
        self.seen.append(("hard", hs.term, hs.commit))

    def on_soft_state(self, leader_id: int, role) -> None:
        self.seen.append(("soft", leader_id))

    def on_read_state(self, index: int, ctx: bytes) -> None:
        self.seen.append(("read", index, ctx))

    def on_fsync(self, took_s: float, entries: int) -> None:
        self.seen.append(("fsync", entries))

    def answer(self, last_index: int, origins: list, results: list) -> None:
        self.seen.append(("answer", last_index, len([o for o in origins if o is not None])))

    def applied(self, index: int) -> None:
        self.seen.append(("applied", index))


class Member:
    """One member: real storage, a RawNode on it, the handler and the pipeline, driven synchronously."""

    def __init__(self, root, id: int = 1, peers: tuple[int, ...] = (1,), bugs: frozenset[str] = frozenset()) -> None:
        self.sm = StateMachine.open(os.path.join(str(root), "db"), 64 << 20, fsync=False)
        self.log = RaftLog.open(os.path.join(str(root), "wal"), 1 << 20, self.sm.applied_index)
        self.snapshots = SnapshotStore(os.path.join(str(root), "snap"))
        self.raw = RawNode(Config(id=id, peers=list(peers), election_tick=10, heartbeat_tick=1,
                                  applied=self.sm.applied_index, rand=random.Random(id)), self.log)
        self.events = Events()
        self.hook = RecordConfState(self.raw.conf_state())
        self.pipeline = ApplyPipeline(self.raw, self.sm, self.events, self.hook, waiting=lambda: True)
        self.handler = ReadyHandler(self.raw, self.log, self.sm, self.snapshots, self.events, clock=lambda: 0.0,
                                    bugs=bugs)
        self.sent: list[Message] = []

    def close(self) -> None:
        self.sm.close()
        self.log.close()

    def step(self) -> list[tuple[str, object]]:
        """Handle one Ready; the steps taken, with what the log and state machine held at each."""
        rd = self.raw.ready()
        trace: list[tuple[str, object]] = []
        for step, payload in self.handler.handle(rd):
            if step is Step.SEND:
                self.sent.extend(payload)
                trace.append(("send", [m.type for m in payload]))
            elif step is Step.APPLY:
                trace.append(("apply", [e.index for e in payload], self.log.last_index()))
                self.pipeline.submit(payload)
                batch = self.pipeline.take()
                self.pipeline.run(batch)
                self.pipeline.finish(batch)
            elif step is Step.PERSIST:
                assert isinstance(payload, Write)
                trace.append(("persist", [e.index for e in payload.entries], payload.hard_state))
                self.handler.persist(payload)
            else:
                trace.append(("install", payload.index))
                self.handler.install_snapshot(payload)
        return trace

    def settle(self) -> None:
        while self.raw.has_ready():
            self.step()


@pytest.fixture
def leader(tmp_path):
    m = Member(tmp_path)
    m.raw.campaign()
    m.settle()
    assert m.raw.status().lead == 1
    yield m
    m.close()


def test_leader_applies_entries_durable_earlier_before_its_next_write(leader):
    leader.raw.propose(put_cmd(b"a", b"1", pid=7))
    first = leader.step()
    assert [s[0] for s in first] == ["persist"]  # a single voter commits once its own write is durable
    leader.raw.propose(put_cmd(b"b", b"2"))
    second = leader.step()
    # the committed entry was durable already: applied (and answered) before this Ready's write
    assert [s[0] for s in second] == ["apply", "persist"]
    applied_index = second[0][1][0]
    assert leader.sm.get(b"a").value == b"1"
    assert ("answer", applied_index, 1) in leader.events.seen


def test_follower_applies_its_new_entries_only_after_writing_them(tmp_path):
    f = Member(tmp_path, id=2, peers=(1, 2))
    ents = [Entry(term=1, index=1, data=b""), Entry(term=1, index=2, data=put_cmd(b"k", b"v"))]
    f.raw.step(Message(MessageType.APPEND, to=2, frm=1, term=1, index=0, log_term=0, entries=ents, commit=2))
    trace = f.step()
    kinds = [s[0] for s in trace]
    assert kinds == ["persist", "send", "apply"], trace
    assert trace[1][1] == [MessageType.APPEND_RESP]  # the ack promises the write: after it
    assert trace[2][2] == 2  # when applied, the log held both entries
    assert f.sm.applied_index == 2 and f.sm.get(b"k").value == b"v"
    f.close()


def test_planted_apply_before_durable_applies_before_the_write(tmp_path):
    f = Member(tmp_path, id=2, peers=(1, 2), bugs=frozenset({faults.APPLY_BEFORE_DURABLE}))
    ents = [Entry(term=1, index=1, data=b""), Entry(term=1, index=2, data=put_cmd(b"k", b"v"))]
    f.raw.step(Message(MessageType.APPEND, to=2, frm=1, term=1, index=0, log_term=0, entries=ents, commit=2))
    trace = f.step()
    assert trace[0][0] == "apply" and trace[0][2] == 0  # applied while the log held nothing
    f.close()


def test_planted_ack_before_fsync_sends_the_ack_first(tmp_path):
    f = Member(tmp_path, id=2, peers=(1, 2), bugs=frozenset({faults.ACK_BEFORE_FSYNC}))
    f.raw.step(Message(MessageType.APPEND, to=2, frm=1, term=1, index=0, log_term=0,
                       entries=[Entry(term=1, index=1, data=b"")], commit=0))
    kinds = [s[0] for s in f.step()]
    assert kinds.index("send") < kinds.index("persist")
    f.close()


def test_commit_only_hard_state_rides_with_the_next_write(tmp_path):
    f = Member(tmp_path, id=2, peers=(1, 2))
    f.raw.step(Message(MessageType.APPEND, to=2, frm=1, term=1, index=0, log_term=0,
                       entries=[Entry(term=1, index=1, data=b"")], commit=0))
    f.settle()
    f.raw.step(Message(MessageType.HEARTBEAT, to=2, frm=1, term=1, commit=1))
    trace = f.step()
    assert "persist" not in [s[0] for s in trace]  # no fsync for a commit index alone
    assert f.handler.unsynced_hard_state is not None and f.handler.unsynced_hard_state.commit == 1
    f.raw.step(Message(MessageType.APPEND, to=2, frm=1, term=1, index=1, log_term=1,
                       entries=[Entry(term=1, index=2, data=b"")], commit=1))
    persist = [s for s in f.step() if s[0] == "persist"]
    assert persist and persist[0][2].commit == 1  # the held-back hard state goes with the entries
    assert f.handler.unsynced_hard_state is None
    f.close()


def test_a_failed_wal_write_stops_the_handler_unless_the_bug_is_planted(tmp_path):
    class FailingLog:
        def append(self, entries, hard_state=None):
            raise StorageFault("fdatasync", "wal/0.wal", 5, "Input/output error")

        def apply_snapshot(self, meta):
            raise AssertionError("not reached")

    for bugs, raises in ((frozenset(), True), (frozenset({faults.FSYNC_ERROR_NOT_FATAL}), False)):
        h = ReadyHandler(None, FailingLog(), None, None, Events(), clock=lambda: 0.0, bugs=bugs)  # type: ignore[arg-type]
        if raises:
            with pytest.raises(StorageFault):
                h.persist(Write([Entry(term=1, index=1)], None))
        else:
            h.persist(Write([Entry(term=1, index=1)], None))  # TESTING: carries on


def test_conf_change_and_empty_entries_are_dispatched_and_applied_index_reported_after_apply(leader):
    raw, pipeline = leader.raw, leader.pipeline
    index = raw.status().commit
    assert raw.status().applied == index
    raw.propose_conf_change(ConfChange(ConfChange.ADD_LEARNER, 4))
    raw.propose(put_cmd(b"x", b"1"))
    leader.step()  # written, and committed (a single voter)
    rd = raw.ready()
    committed = []
    for step, payload in leader.handler.handle(rd):
        if step is Step.APPLY:
            committed.extend(payload)
    assert [e.type for e in committed] == [EntryType.CONF_CHANGE, EntryType.NORMAL]
    assert raw.status().applied == index  # handed out, not applied: the core is not told yet
    pipeline.submit(committed)
    batch = pipeline.take()
    assert batch.items[0] == (committed[0].index, committed[0].term, b"")  # the state machine only moves on
    assert batch.conf_changes == [committed[0]]
    pipeline.run(batch)
    assert raw.status().applied == index and leader.hook.index == 0  # LMDB has it; finish not yet run
    pipeline.finish(batch)
    assert raw.status().applied == committed[-1].index == leader.sm.applied_index
    assert leader.hook.index == committed[0].index and leader.hook.conf_state.learners == [4]
    assert ("applied", committed[-1].index) in leader.events.seen


def test_answers_come_before_the_lmdb_commit_and_reads_after_it(leader):
    leader.raw.propose(put_cmd(b"a", b"1", pid=9))
    leader.settle()
    leader.raw.propose(put_cmd(b"b", b"1"))
    leader.settle()
    seen = [e for e in leader.events.seen if e[0] in ("answer", "applied")]
    assert seen[-2][0] == "answer" and seen[-1][0] == "applied"


def test_snapshot_install_puts_the_state_machine_first_then_resets_the_log_then_drops_the_image(tmp_path):
    src = Member(tmp_path / "src")
    src.raw.campaign()
    src.settle()
    for i in range(5):
        src.raw.propose(put_cmd(b"k%d" % i, b"v"))
        src.settle()
    index, term, _path = src.snapshots.create(src.sm, [1, 2])
    dst = Member(tmp_path / "dst", id=2, peers=(1, 2))
    dst.log.append([Entry(term=1, index=1, data=b""), Entry(term=1, index=2, data=b"stale")])
    with open(_path, "rb") as image, dst.snapshots.receive(index, term, [1, 2]) as w:
        data = image.read()
        w.write(data)
        w.commit(len(data), crc32c(data))
    src.close()
    calls: list[str] = []
    install, reset = dst.sm.install_snapshot, dst.log.apply_snapshot
    dst.sm.install_snapshot = lambda p: (calls.append("state machine"), install(p))[1]  # type: ignore[method-assign]
    dst.log.apply_snapshot = lambda m: (calls.append(f"log reset:{len(dst.snapshots.list())}"), reset(m))[1]  # type: ignore[method-assign]
    dst.handler.install_snapshot(SnapshotMetadata(index=index, term=term, conf_state=ConfState(voters=[1, 2])))
    assert calls == ["state machine", "log reset:1"]  # the image is kept until the log is reset
    assert dst.sm.applied_index == index and dst.sm.get(b"k4").value == b"v"
    assert dst.log.first_index() == index + 1 and dst.log.last_index() == index
    assert dst.snapshots.list() == []
    dst.close()
