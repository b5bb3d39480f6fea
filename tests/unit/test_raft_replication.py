"""Log replication and commitment: Raft paper §5.3, §5.4.2 (Figure 8); flow control."""
from __future__ import annotations

import random

from kvstore.raft import Config, Entry, MemoryStorage, Message, MessageType as MT, RawNode, StateRole, ProposalDropped
from kvstore.raft import faults
from kvstore.raft.progress import ProgressState
from tests.sim.harness import Cluster

import pytest


def test_5_3_proposal_replicates_commits_and_applies_in_order_everywhere():
    c = Cluster(5)
    c.campaign(1)
    for k in range(10):
        c.propose(1, b"v%d" % k)
    for i in c.ids:
        assert c.applied_data(i) == [b"v%d" % k for k in range(10)]
        assert c.raft(i).log.committed == 11


def test_5_3_follower_rejects_append_whose_previous_entry_does_not_match():
    st = MemoryStorage()
    st.append([Entry(1, 1), Entry(1, 2)])
    n = RawNode(Config(id=2, peers=[1, 2, 3], rand=random.Random(0)), st)
    n.step(Message(MT.APPEND, frm=1, to=2, term=2, index=2, log_term=2, entries=[Entry(2, 3)]))
    [resp] = n.ready().persisted_messages
    assert resp.reject and resp.index == 2
    # fast backtracking hint: our last index whose term <= 2, and its term
    assert (resp.reject_hint, resp.reject_hint_term) == (2, 1)


def test_5_3_conflicting_uncommitted_suffix_is_overwritten():
    st = MemoryStorage()
    st.append([Entry(1, 1), Entry(2, 2), Entry(2, 3)])
    n = RawNode(Config(id=2, peers=[1, 2, 3], rand=random.Random(0)), st)
    n.step(Message(MT.APPEND, frm=1, to=2, term=3, index=1, log_term=1, entries=[Entry(3, 2)], commit=2))
    rd = n.ready()
    assert [(e.index, e.term) for e in rd.entries] == [(2, 3)]
    st.append(rd.entries)
    assert st.last_index() == 2 and st.term(2) == 3
    assert [(e.index, e.term) for e in rd.committed_entries] == [(1, 1), (2, 3)]


def _diverged_cluster(max_size=1 << 20):
    """Node 1 leads term 1 with 20 entries; node 3 missed all of them and has a term-2 tail of its own."""
    c = Cluster(3, pre_vote=False, max_size_per_msg=max_size)
    c.campaign(1)
    c.isolate(3)
    for k in range(20):
        c.propose(1, b"x%d" % k)
    return c


def test_5_3_fast_backtracking_needs_few_probes():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.cut(1, 3)
    c.cut(2, 3)
    for k in range(30):
        c.propose(1, b"a%d" % k)
    # node 3 gathers a long divergent tail in term 5 (as an isolated leader would)
    st3 = c.storage[3]
    st3.append([Entry(5, st3.last_index() + 1 + k, data=b"z") for k in range(40)])
    c.crash(3)
    c.start(3)
    c.heal()
    c.delivered.clear()
    c.tick(1, n=1)  # heartbeat: node 3 answers, leader probes
    c.stabilize()
    rejects = [m for m in c.delivered if m.type == MT.APPEND_RESP and m.frm == 3 and m.reject]
    assert len(rejects) <= 2, [(m.index, m.reject_hint, m.reject_hint_term) for m in rejects]
    assert c.raft(3).log.last_index() == c.raft(1).log.last_index()
    assert c.applied_data(3)[-1] == b"a29"


def test_flow_control_max_size_per_msg_and_inflight_window():
    c = Cluster(3, pre_vote=False, max_size_per_msg=1, max_inflight_msgs=2)
    c.campaign(1)
    c.drop_types.add(MT.APPEND_RESP)  # acks are lost: the window must fill up and stop
    c.delivered.clear()
    for k in range(10):
        c.nodes[1].propose(b"p%d" % k)
    c.stabilize()
    appends = [m for m in c.delivered if m.type == MT.APPEND and m.to == 2]
    assert appends and all(len(m.entries) <= 1 for m in appends)
    assert len([m for m in appends if m.entries]) == 2  # max_inflight_msgs
    pr = c.nodes[1].status().progress[2]
    assert pr.state == ProgressState.REPLICATE and pr.inflight == 2
    c.heal()
    c.tick(n=3)
    assert c.applied_data(2)[-1] == b"p9"


def test_max_size_per_msg_batches_many_entries_per_append():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.isolate(3)
    for k in range(50):
        c.propose(1, b"q%d" % k)
    c.heal()
    c.delivered.clear()
    c.tick(1)
    big = [m for m in c.delivered if m.type == MT.APPEND and m.to == 3 and m.entries]
    assert big and max(len(m.entries) for m in big) >= 50


def test_5_4_2_leader_counts_itself_only_after_its_own_fsync():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.isolate(1)
    n1 = c.nodes[1]
    n1.propose(b"solo")
    rd = n1.ready()
    assert rd.entries and [m for m in rd.messages if m.type == MT.APPEND]  # sent before the fsync
    assert n1.status().progress[1].match < rd.entries[-1].index
    c.storage[1].append(rd.entries)
    n1.advance(rd)
    assert n1.status().progress[1].match == rd.entries[-1].index


def _figure8(bugs=frozenset()):
    """Raft paper Figure 8 (c): leader 1 of term 4 re-replicates its term-2 entry to node 3."""
    ids = [1, 2, 3, 4, 5]
    c = Cluster(5, pre_vote=False, max_size_per_msg=1, testing_bugs=bugs)
    base = [Entry(1, 1)]
    logs = {1: base + [Entry(2, 2, data=b"t2")], 2: base + [Entry(2, 2, data=b"t2")],
            3: base, 4: base, 5: base + [Entry(3, 2, data=b"t3")]}
    for i in ids:
        st = c.storage[i]
        st.append(logs[i])
        from kvstore.raft import HardState
        st.set_hard_state(HardState(term=3 if i != 5 else 3, vote=0, commit=1))
        c.crash(i)
        c.start(i)
    c.isolate(5)
    c.cut(1, 4)
    c.cut(2, 4)
    c.campaign(1)  # term 4 with votes of 1, 2, 3
    return c


def test_5_4_2_old_term_entry_is_not_committed_by_counting_replicas():
    c = _figure8()
    r1 = c.raft(1)
    assert r1.state == StateRole.LEADER and r1.term == 4
    assert r1.log.term(2) == 2
    # with appends of one entry, node 3 acknowledges index 2 before the term-4 no-op arrives;
    # index 2 is on 3 of 5 nodes, yet it commits only with the no-op of term 4
    acked_2 = [m for m in c.delivered if m.type == MT.APPEND_RESP and m.to == 1 and m.index == 2]
    assert acked_2  # the dangerous moment happened...
    assert not [m for m in c.delivered if m.frm == 1 and m.commit == 2]  # ...and commit jumped 1 -> 3
    assert r1.log.committed == 3 and r1.log.term(3) == 4


def test_5_4_2_planted_bug_commits_the_old_term_entry_early():
    c = _figure8(frozenset({faults.COMMIT_OLD_TERM}))
    early = [m for m in c.delivered if m.type == MT.APPEND and m.frm == 1 and m.commit == 2]
    assert early  # the buggy leader advertised index 2 as committed before its own term's entry


def test_proposal_dropped_on_follower_and_without_leader():
    c = Cluster(3)
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose(b"x")
    c.campaign(1)
    with pytest.raises(ProposalDropped):
        c.nodes[2].propose(b"x")


def test_max_uncommitted_size_drops_proposals():
    c = Cluster(3, pre_vote=False, max_uncommitted_size=100)
    c.campaign(1)
    c.isolate(1)
    c.nodes[1].propose(b"a" * 60)
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose(b"b" * 60)


def test_snapshot_sent_to_follower_behind_compaction_and_installed_through_ready():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.isolate(3)
    for k in range(20):
        c.propose(1, b"s%d" % k)
    st1 = c.storage[1]
    applied = c.raft(1).log.applied
    st1.create_snapshot(applied, c.nodes[1].conf_state(), b"IMAGE")
    st1.compact(applied)
    c.heal()
    c.delivered.clear()
    c.tick(1)
    snaps = [m for m in c.delivered if m.type == MT.SNAPSHOT and m.to == 3]
    assert len(snaps) == 1 and snaps[0].snapshot.data == b"IMAGE"
    assert c.storage[3].snapshot().metadata.index == applied
    c.nodes[1].report_snapshot(3, True)
    c.propose(1, b"after")
    assert c.applied_data(3) == [b"after"]
    assert c.nodes[1].status().progress[3].match == c.raft(1).log.last_index()


def test_restart_recovers_hard_state_and_log_from_storage():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    for k in range(5):
        c.propose(1, b"r%d" % k)
    term, commit = c.raft(2).term, c.raft(2).log.committed
    c.crash(2)
    n2 = c.start(2)
    assert n2.raft.term == term and n2.raft.log.committed == commit
    assert n2.raft.log.applied == commit  # Config.applied from the state machine
    assert not n2.raft.log.has_next_committed()
