"""Membership changes in the core: single-server changes (thesis §4.1), learners, promotion, removal."""
from __future__ import annotations

import pytest

from kvstore.raft import ConfChange, ConfChangeRefused, ConfState, StateRole
from kvstore.raft import faults
from tests.sim.harness import Cluster

ADD, REMOVE, LEARNER = ConfChange.ADD_NODE, ConfChange.REMOVE_NODE, ConfChange.ADD_LEARNER


def change(c: Cluster, leader: int, kind: int, id: int, force: bool = False) -> None:
    c.nodes[leader].propose_conf_change(ConfChange(kind, id), force=force)
    c.stabilize()


def with_learner(bugs=frozenset(), **kw) -> Cluster:
    """Voters 1, 2, 3 with leader 1, and learner 4 caught up."""
    c = Cluster(3, apply_conf_changes=True, testing_bugs=frozenset(bugs), **kw)
    c.campaign(1)
    change(c, 1, LEARNER, 4)
    c.add(4, conf_state=ConfState(voters=[1, 2, 3], learners=[4]))
    c.propose(1, b"x")
    assert c.applied_data(4)[-1] == b"x"  # a learner gets the log
    return c


def test_learner_is_never_counted_in_a_quorum():
    c = with_learner()
    c.cut(1, 2)
    c.cut(1, 3)
    before = c.raft(1).log.committed
    c.nodes[1].propose(b"lonely")
    c.stabilize()
    assert c.raft(4).log.last_index() == c.raft(1).log.last_index()  # the learner has it and acked
    assert c.raft(1).log.committed == before  # leader + learner is not a quorum of 3 voters


def test_planted_learner_in_quorum_commits_without_a_voter_majority():
    c = with_learner(bugs={faults.LEARNER_IN_QUORUM})
    c.cut(1, 2)
    c.cut(1, 3)
    before = c.raft(1).log.committed
    c.nodes[1].propose(b"lonely")
    c.stabilize()
    assert c.raft(1).log.committed > before  # the teeth: the test above fails with this bug


def test_learner_never_campaigns():
    c = with_learner()
    c.isolate(1)
    term = c.raft(4).term
    for _ in range(100):
        c.nodes[4].tick()
        c.stabilize()
    assert c.raft(4).state == StateRole.FOLLOWER and c.raft(4).term == term
    assert not any(m.frm == 4 and m.type.name in ("VOTE", "PRE_VOTE") for m in c.delivered)


def test_promote_refused_with_the_lag_then_accepted_when_caught_up():
    c = with_learner(max_learner_lag=5)
    c.isolate(4)
    for k in range(10):
        c.propose(1, b"w%d" % k)
    with pytest.raises(ConfChangeRefused, match=r"learner 4 is 10 entries behind the leader \(at most 5"):
        c.nodes[1].propose_conf_change(ConfChange(ADD, 4))
    c.heal()
    c.tick(1, 2)  # a heartbeat: the learner catches up
    change(c, 1, ADD, 4)
    assert c.nodes[1].conf_state() == ConfState(voters=[1, 2, 3, 4], learners=[])
    assert c.raft(1).tracker.quorum() == 3 and c.raft(4).promotable()


def test_no_change_before_the_leader_commits_an_entry_of_its_term():
    c = Cluster(3, apply_conf_changes=True)
    c.isolate(1)
    c.nodes[1].campaign()
    c.heal()
    r = c.raft(1)
    r.become_candidate()
    r.become_leader()  # its no-op is not committed yet
    with pytest.raises(ConfChangeRefused, match="not yet committed an entry of its term"):
        c.nodes[1].propose_conf_change(ConfChange(LEARNER, 4))


def test_one_change_at_a_time_and_the_planted_bug():
    for bugs, refused in ((frozenset(), True), (frozenset({faults.TWO_CONF_CHANGES_IN_FLIGHT}), False)):
        c = Cluster(3, apply_conf_changes=True, testing_bugs=bugs)
        c.campaign(1)
        c.isolate(1)
        c.nodes[1].propose_conf_change(ConfChange(LEARNER, 4))
        if refused:
            with pytest.raises(ConfChangeRefused, match="one change at a time"):
                c.nodes[1].propose_conf_change(ConfChange(LEARNER, 5))
        else:
            c.nodes[1].propose_conf_change(ConfChange(LEARNER, 5))


def test_removing_the_leader_it_steps_down_and_the_rest_go_on():
    c = Cluster(3, apply_conf_changes=True)
    c.campaign(1)
    change(c, 1, REMOVE, 1)
    assert c.raft(1).state == StateRole.FOLLOWER and not c.raft(1).promotable()
    for _ in range(60):
        c.tick()
        if c.leader() in (2, 3):
            break
    lead = c.leader()
    assert lead in (2, 3) and c.nodes[lead].conf_state().voters == [2, 3]
    c.propose(lead, b"after")
    assert c.applied_data(2)[-1] == c.applied_data(3)[-1] == b"after"
    assert c.raft(1).state == StateRole.FOLLOWER  # never campaigns again


def test_strict_reconfig_check():
    c = Cluster(3, apply_conf_changes=True)
    c.campaign(1)
    c.crash(3)
    for _ in range(2 * c.raft(1).election_timeout):  # check_quorum clears 3's recent_active
        c.tick(1)
    with pytest.raises(ConfChangeRefused, match=r"would need 3 of 4 voters .* only 2 are reachable"):
        c.nodes[1].propose_conf_change(ConfChange(ADD, 4))
    with pytest.raises(ConfChangeRefused, match="fewer than the 2 a quorum needs"):
        c.nodes[1].propose_conf_change(ConfChange(REMOVE, 2))
    change(c, 1, LEARNER, 4)  # a learner needs nobody (and 4 never starts)
    change(c, 1, REMOVE, 3)  # removing the dead member is fine: 1 and 2 are a quorum of 2
    assert c.nodes[1].conf_state() == ConfState(voters=[1, 2], learners=[4])


def test_invalid_changes_are_refused():
    c = Cluster(3, apply_conf_changes=True)
    c.campaign(1)
    for cc, msg in ((ConfChange(ADD, 2), "already a voter"), (ConfChange(LEARNER, 3), "already a voter"),
                    (ConfChange(REMOVE, 9), "not in the cluster"), (ConfChange(ADD, 0), "must be > 0")):
        with pytest.raises(ConfChangeRefused, match=msg):
            c.nodes[1].propose_conf_change(cc)


def test_restart_takes_the_membership_the_state_machine_kept():
    c = Cluster(3, apply_conf_changes=True)
    c.campaign(1)
    change(c, 1, LEARNER, 4)
    c.crash(2)
    # applied entries are not replayed to the core: without the kept membership, learner 4 is forgotten
    assert c.start(2).conf_state() == ConfState(voters=[1, 2, 3], learners=[])
    c.crash(2)
    n = c.start(2, conf_state=ConfState(voters=[1, 2, 3], learners=[4]))
    assert n.conf_state() == ConfState(voters=[1, 2, 3], learners=[4])


def test_no_campaign_while_a_committed_membership_change_is_unapplied():
    """After a restart whose state machine lagged (a power cut rolls it back to its base), the membership
    in force is older than the committed one: campaigning in it could win with an outdated quorum."""
    c = Cluster(3, apply_conf_changes=True)
    c.campaign(1)
    change(c, 1, REMOVE, 3)
    c.crash(2)
    # restart 2 as if its state machine had lost the removal: applied before it, old membership
    removal = next(e.index for e in c.applied[2] if e.type.name == "CONF_CHANGE")
    c.applied[2] = [e for e in c.applied[2] if e.index < removal]
    n = c.start(2, conf_state=ConfState(voters=[1, 2, 3], learners=[]))
    assert n.raft.log.committed >= removal > n.raft.log.applied
    n.campaign()
    assert n.raft.state == StateRole.FOLLOWER and n.raft.term == c.raft(1).term  # waits for the apply
    c.stabilize()  # the committed entries are applied (the harness applies conf changes): now it may
    assert n.conf_state().voters == [1, 2]
    n.campaign()
    assert n.raft.state != StateRole.FOLLOWER


def test_a_removed_leader_cut_off_before_the_others_heard_the_removal_committed():
    """Leader 2 of voters [1, 2] removes itself; 1 acks, 2 commits and applies the removal, then is cut off
    and loses power before 1 hears of the commit. 1 still counts 2 as a voter, and 2 (its log one entry
    longer, never campaigning) refuses it its vote. 1 must learn the commit from that refusal: without it,
    no leader is ever elected (simulator seed 140901)."""
    c = Cluster(2, apply_conf_changes=True)
    c.campaign(2)
    c.nodes[2].propose_conf_change(ConfChange(REMOVE, 2))
    c.handle_ready(2)
    while c.queue:  # the removal reaches 1
        c.deliver(c.queue.popleft())
    c.nodes[2].propose(b"after the removal")  # appended at 2 before the removal applies, never sent
    c.blocked.add((2, 1))  # 1 -> 2 still flows: 1's ack commits the removal at 2
    c.stabilize()
    assert c.nodes[2].conf_state().voters == [1]
    assert c.raft(1).log.committed < c.raft(2).log.committed
    assert c.raft(2).log.last_index() > c.raft(1).log.last_index()
    c.crash(2)
    c.start(2, conf_state=ConfState(voters=[1], learners=[]))
    c.heal()
    for _ in range(10 * c.raft(1).election_timeout):
        c.tick()
        if c.leader() == 1:
            break
    assert c.leader() == 1 and c.nodes[1].conf_state().voters == [1]
    c.propose(1, b"served again")
    assert c.applied_data(1)[-1] == b"served again"
