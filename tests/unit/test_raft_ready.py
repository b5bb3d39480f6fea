"""The Ready contract (send-now vs send-after-fsync, thesis §10.2.1), MemoryStorage, membership hooks."""
from __future__ import annotations

import random

import pytest

from kvstore.raft import (
    CompactedError, ConfChange, Config, Entry, EntryType, HardState, MemoryStorage, Message, MessageType as MT,
    RawNode, StateRole, UnavailableError, decode_conf_change,
)
from kvstore.raft import faults
from tests.sim.harness import Cluster


def node(id=1, peers=(1, 2, 3), storage=None, **kw):
    return RawNode(Config(id=id, peers=list(peers), rand=random.Random(id), **kw), storage or MemoryStorage())


def test_vote_response_waits_for_the_fsync_but_leader_appends_do_not():
    f = node(id=2, pre_vote=False)
    f.step(Message(MT.VOTE, frm=1, to=2, term=1, index=0, log_term=0))
    rd = f.ready()
    assert rd.hard_state == HardState(term=1, vote=1, commit=0) and rd.must_sync
    assert [m.type for m in rd.persisted_messages] == [MT.VOTE_RESP] and rd.messages == []
    f.advance(rd)

    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.nodes[1].propose(b"x")
    rd = c.nodes[1].ready()
    assert [m.type for m in rd.messages] == [MT.APPEND, MT.APPEND] and rd.entries


def test_append_ack_waits_for_the_fsync():
    f = node(id=2)
    f.step(Message(MT.APPEND, frm=1, to=2, term=1, index=0, log_term=0, entries=[Entry(1, 1, data=b"a")]))
    rd = f.ready()
    assert rd.entries and rd.messages == []
    assert [(m.type, m.index) for m in rd.persisted_messages] == [(MT.APPEND_RESP, 1)]


def test_planted_bug_sends_the_vote_before_the_fsync():
    f = node(id=2, pre_vote=False, testing_bugs=frozenset({faults.VOTE_BEFORE_PERSIST}))
    f.step(Message(MT.VOTE, frm=1, to=2, term=1, index=0, log_term=0))
    assert [m.type for m in f.ready().messages] == [MT.VOTE_RESP]


def test_ready_then_advance_protocol():
    n = node(pre_vote=False)
    assert not n.has_ready()
    n.campaign()
    assert n.has_ready()
    rd = n.ready()
    assert rd.soft_state is not None and rd.soft_state.role == StateRole.CANDIDATE
    with pytest.raises(RuntimeError):
        n.ready()
    assert not n.has_ready()  # until advance
    n.step(Message(MT.VOTE_RESP, frm=2, to=1, term=1))  # stepping between ready and advance is fine
    n.advance(rd)
    assert n.raft.state == StateRole.LEADER
    rd2 = n.ready()
    assert rd2.soft_state.role == StateRole.LEADER and rd2.soft_state.leader_id == 1
    assert [(e.index, e.term, e.data) for e in rd2.entries] == [(1, 1, b"")]
    with pytest.raises(RuntimeError):
        n.advance(rd)


def test_entries_overwritten_between_ready_and_advance_are_reissued():
    st = MemoryStorage()
    f = node(id=2, storage=st)
    f.step(Message(MT.APPEND, frm=1, to=2, term=1, index=0, log_term=0,
                   entries=[Entry(1, 1), Entry(1, 2, data=b"old")]))
    rd = f.ready()
    # while the fsync of rd runs, a new leader overwrites index 2
    f.step(Message(MT.APPEND, frm=3, to=2, term=2, index=1, log_term=1, entries=[Entry(2, 2, data=b"new")]))
    st.append(rd.entries)
    f.advance(rd)
    rd2 = f.ready()
    assert [(e.index, e.term) for e in rd2.entries] == [(1, 1), (2, 2)] or \
        [(e.index, e.term) for e in rd2.entries] == [(2, 2)]
    st.append(rd2.entries)
    f.advance(rd2)
    assert st.term(2) == 2 and st.entries(2, 3)[0].data == b"new"


def test_step_rejects_local_message_types():
    n = node()
    for t in (MT.HUP, MT.BEAT, MT.PROPOSE):
        with pytest.raises(ValueError):
            n.step(Message(t))


def test_status_reports_progress_on_the_leader_only():
    c = Cluster(3)
    c.campaign(1)
    st = c.nodes[1].status()
    assert st.role == StateRole.LEADER and st.lead == 1 and set(st.progress) == {1, 2, 3}
    assert st.progress[2].match == st.commit
    assert c.nodes[2].status().progress == {}


def test_memory_storage_append_truncate_compact_snapshot():
    st = MemoryStorage()
    st.append([Entry(1, i) for i in range(1, 6)])
    assert (st.first_index(), st.last_index()) == (1, 5)
    st.append([Entry(2, 4), Entry(2, 5), Entry(2, 6)])
    assert [st.term(i) for i in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    with pytest.raises(UnavailableError):
        st.term(7)
    assert len(st.entries(1, 7, max_bytes=1)) == 1
    snap = st.create_snapshot(4, None, b"img")
    assert snap.metadata.index == 4 and snap.metadata.term == 2
    st.compact(4)
    assert st.first_index() == 5 and st.term(4) == 2
    with pytest.raises(CompactedError):
        st.entries(4, 6)
    with pytest.raises(CompactedError):
        st.term(3)


def test_conf_change_add_then_remove_voter_changes_quorum():
    c = Cluster(3, ids=[1, 2, 3])
    c.campaign(1)
    n1 = c.nodes[1]
    n1.propose_conf_change(ConfChange(ConfChange.ADD_NODE, 4))
    c.stabilize()
    [e] = [e for e in c.applied[1] if e.type == EntryType.CONF_CHANGE]
    cc = decode_conf_change(e.data)
    assert (cc.change_type, cc.node_id) == (ConfChange.ADD_NODE, 4)
    cs = n1.apply_conf_change(cc)
    assert cs.voters == [1, 2, 3, 4]
    assert 4 in n1.status().progress
    assert n1.raft.tracker.quorum() == 3
    # the new member is unreachable: with 4 voters a write needs 3 acks, which 1, 2, 3 give
    c.propose(1, b"with4")
    assert c.applied_data(2)[-1] == b"with4"
    cs = n1.apply_conf_change(ConfChange(ConfChange.REMOVE_NODE, 4))
    assert cs.voters == [1, 2, 3] and 4 not in n1.status().progress


def test_only_one_conf_change_in_flight():
    c = Cluster(3)
    c.campaign(1)
    c.isolate(1)
    c.nodes[1].propose_conf_change(ConfChange(ConfChange.ADD_NODE, 4))
    from kvstore.raft import ProposalDropped
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose_conf_change(ConfChange(ConfChange.REMOVE_NODE, 3))


def test_committed_entries_of_earlier_readies_are_durable_but_a_followers_new_ones_are_not():
    """The loop applies committed entries before persisting a Ready only if committed_are_durable()."""
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    leader = c.nodes[1]
    leader.propose(b"a")
    rd = c.handle_ready(1)  # the leader persists "a" and sends it
    c.deliver(c.queue.popleft())  # follower 2 gets it
    c.handle_ready(2)  # ... persists it and acks
    c.queue = type(c.queue)(m for m in c.queue if m.frm == 2)
    c.deliver(c.queue.popleft())  # "a" is committed on the leader
    leader.propose(b"b")
    rd = leader.ready()
    assert [e.data for e in rd.committed_entries] == [b"a"] and [e.data for e in rd.entries] == [b"b"]
    assert rd.committed_are_durable()  # "a" was persisted with an earlier Ready: apply it before "b"'s fsync
    leader.advance(rd)

    follower = node(id=3)
    follower.step(Message(MT.APPEND, frm=1, to=3, term=1, index=0, log_term=0, commit=1,
                          entries=[Entry(1, 1, data=b"a")]))
    rd = follower.ready()
    assert [e.data for e in rd.committed_entries] == [b"a"] and [e.data for e in rd.entries] == [b"a"]
    assert not rd.committed_are_durable()  # committed, but not yet in this member's log
