"""ReadIndex (Raft thesis §6.4) and leadership transfer (thesis §3.10)."""
from __future__ import annotations

import pytest

from kvstore.raft import HardState, MessageType as MT, ProposalDropped, ReadState, StateRole
from kvstore.raft import faults
from tests.sim.harness import Cluster


def test_6_4_read_index_confirms_leadership_with_a_heartbeat_round():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"w")
    c.delivered.clear()
    c.nodes[1].read_index(b"r1")
    c.stabilize()
    beats = [m for m in c.delivered if m.type == MT.HEARTBEAT and m.context == b"r1"]
    acks = [m for m in c.delivered if m.type == MT.HEARTBEAT_RESP and m.context == b"r1"]
    assert len(beats) == 2 and acks
    assert c.read_states[1] == [ReadState(c.raft(1).log.committed, b"r1")]


def test_6_4_partitioned_leader_serves_no_read():
    c = Cluster(3, check_quorum=False)
    c.campaign(1)
    c.isolate(1)
    c.nodes[1].read_index(b"r1")
    c.tick(1, n=5)
    assert c.read_states[1] == []


def test_6_4_planted_bug_serves_the_read_without_a_quorum():
    c = Cluster(3, check_quorum=False, testing_bugs=frozenset({faults.READ_WITHOUT_HEARTBEAT}))
    c.campaign(1)
    c.isolate(1)
    c.nodes[1].read_index(b"r1")
    c.stabilize()
    assert [rs.ctx for rs in c.read_states[1]] == [b"r1"]


def test_6_4_read_waits_for_the_leaders_first_commit_in_its_term():
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.campaign(1)
    c.drop_types.add(MT.APPEND)  # the new leader's no-op cannot be replicated yet
    c.campaign(2)
    r2 = c.raft(2)
    assert r2.state == StateRole.LEADER and r2.term == 2
    assert not r2.committed_entry_in_current_term()
    c.nodes[2].read_index(b"early")
    c.stabilize()
    assert c.read_states[2] == []
    c.heal()
    c.tick(2)
    assert r2.committed_entry_in_current_term()
    assert c.read_states[2] == [ReadState(r2.log.committed, b"early")]


def test_6_4_follower_read_is_forwarded_and_answered_by_the_leader():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"w")
    c.delivered.clear()
    c.nodes[3].read_index(b"f1")
    c.stabilize()
    assert any(m.type == MT.READ_INDEX and m.frm == 3 and m.to == 1 for m in c.delivered)
    assert c.read_states[3] == [ReadState(c.raft(1).log.committed, b"f1")]


def test_6_4_read_without_known_leader_is_dropped():
    c = Cluster(3)
    with pytest.raises(ProposalDropped):
        c.nodes[2].read_index(b"x")
    with pytest.raises(ValueError):
        c.nodes[2].read_index(b"")


def test_6_4_single_node_reads_immediately():
    c = Cluster(1)
    c.campaign(1)
    c.nodes[1].read_index(b"solo")
    c.stabilize()
    assert c.read_states[1] == [ReadState(1, b"solo")]


def test_6_4_single_voter_read_waits_for_its_own_terms_commit():
    """A restarted single voter knows only the commit index it last wrote and what its state
    machine kept, which may be below an acknowledged write: until an entry of its new term
    commits, it must not answer a read."""
    c = Cluster(1)
    c.campaign(1)
    for v in (b"a", b"b", b"c"):
        c.propose(1, v)
    acked = c.raft(1).log.committed
    assert acked == 4
    st = c.storage[1]
    hs = st.hard_state()
    st.set_hard_state(HardState(hs.term, hs.vote, 1))  # the commit-only hard state was never synced
    c.applied[1].clear()  # clients were answered before the state machine's commit, which was lost
    c.crash(1)
    c.start(1)
    c.nodes[1].campaign()  # a single voter wins at once, before its no-op is durable
    c.nodes[1].read_index(b"after-restart")
    c.stabilize()
    [rs] = c.read_states[1]
    assert rs.ctx == b"after-restart"
    assert rs.index >= acked, f"read index {rs.index} is below the acknowledged write at {acked}"


def test_3_10_transfer_to_an_up_to_date_follower_uses_timeout_now():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"w")
    c.delivered.clear()
    c.nodes[1].transfer_leader(3)
    c.stabilize()
    assert any(m.type == MT.TIMEOUT_NOW and m.to == 3 for m in c.delivered)
    assert c.leader() == 3 and c.raft(3).term == 2
    assert not any(m.type == MT.PRE_VOTE for m in c.delivered)  # a transfer skips the pre-vote


def test_3_10_transfer_first_catches_the_transferee_up_and_blocks_proposals():
    c = Cluster(3)
    c.campaign(1)
    c.isolate(3)
    for k in range(5):
        c.propose(1, b"t%d" % k)
    c.nodes[1].transfer_leader(3)
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose(b"during")
    assert c.nodes[1].status().lead_transferee == 3
    c.heal()
    c.tick(1)
    assert c.leader() == 3
    assert c.applied_data(3) == [b"t%d" % k for k in range(5)]


def test_3_10_transfer_aborts_after_an_election_timeout():
    c = Cluster(3)
    c.campaign(1)
    c.isolate(3)
    c.propose(1, b"behind")  # node 3 is behind, so no TIMEOUT_NOW can be sent yet
    c.nodes[1].transfer_leader(3)
    r1 = c.raft(1)
    assert r1.lead_transferee == 3
    c.tick(1, n=r1.election_timeout)
    assert r1.state == StateRole.LEADER and r1.lead_transferee == 0
    c.propose(1, b"again")  # proposals are accepted again
    assert c.applied_data(2)[-1] == b"again"


def test_3_10_transfer_requested_on_a_follower_is_forwarded():
    c = Cluster(3)
    c.campaign(1)
    c.nodes[2].transfer_leader(2)
    c.stabilize()
    assert c.leader() == 2
