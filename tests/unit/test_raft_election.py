"""Leader election: Raft paper §5.2, §5.4.1; thesis §9.6 PreVote and CheckQuorum (§6.2)."""
from __future__ import annotations

import random

from kvstore.raft import Config, MemoryStorage, Message, MessageType as MT, RawNode, StateRole, Entry
from kvstore.raft import faults
from tests.sim.harness import Cluster


def single(id=1, peers=(1, 2, 3), **kw) -> RawNode:
    return RawNode(Config(id=id, peers=list(peers), rand=random.Random(id), **kw), MemoryStorage())


def drain(node: RawNode):
    rd = node.ready()
    node.advance(rd)
    return rd


def test_5_2_follower_times_out_into_candidate_with_a_new_term_and_its_own_vote():
    n = single(pre_vote=False)
    r = n.raft
    for _ in range(2 * r.election_timeout):
        n.tick()
        if r.state != StateRole.FOLLOWER:
            break
    assert r.state == StateRole.CANDIDATE and r.term == 1 and r.vote == 1
    rd = n.ready()
    assert rd.hard_state.term == 1 and rd.hard_state.vote == 1 and rd.must_sync
    votes = [m for m in rd.persisted_messages if m.type == MT.VOTE]
    assert sorted(m.to for m in votes) == [2, 3]
    assert not [m for m in rd.messages if m.type == MT.VOTE]  # requests wait for the vote to be durable


def test_5_2_randomized_election_timeouts_are_in_range_and_vary():
    seen = set()
    for seed in range(40):
        n = RawNode(Config(id=1, peers=[1, 2, 3], rand=random.Random(seed)), MemoryStorage())
        t = n.raft.randomized_election_timeout
        assert 10 <= t < 20
        seen.add(t)
    assert len(seen) > 3


def test_5_2_candidate_with_majority_becomes_leader_and_appends_noop():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    r = c.raft(1)
    assert r.state == StateRole.LEADER and r.term == 1
    # §8: the leader's first entry is an empty no-op of its own term, committed everywhere
    assert [(e.term, e.data) for e in c.applied[2]] == [(1, b"")]
    assert all(c.raft(i).lead == 1 for i in c.ids)


def test_5_2_at_most_one_vote_per_term():
    n = single(id=3, pre_vote=False)
    n.step(Message(MT.VOTE, frm=1, to=3, term=5, index=0, log_term=0))
    n.step(Message(MT.VOTE, frm=2, to=3, term=5, index=0, log_term=0))
    rd = n.ready()
    resp = [(m.to, m.reject) for m in rd.persisted_messages if m.type == MT.VOTE_RESP]
    assert resp == [(1, False), (2, True)]
    assert rd.hard_state.vote == 1 and rd.hard_state.term == 5


def test_5_2_candidate_steps_down_on_append_from_leader_of_same_term():
    n = single(pre_vote=False)
    n.campaign()
    drain(n)
    n.step(Message(MT.APPEND, frm=2, to=1, term=1, index=0, log_term=0, entries=[], commit=0))
    assert n.raft.state == StateRole.FOLLOWER and n.raft.lead == 2


def test_5_2_split_vote_then_a_new_election_resolves():
    c = Cluster(3, pre_vote=False)
    c.cut(1, 2)
    c.nodes[1].campaign()
    c.nodes[2].campaign()
    c.stabilize()  # node 3 votes for whichever request it saw first
    leaders = [i for i in c.ids if c.raft(i).state == StateRole.LEADER]
    assert len(leaders) == 1
    c.heal()
    c.tick(n=50)
    assert len({c.raft(i).lead for i in c.ids}) == 1 and c.leader()


def test_5_4_1_vote_denied_to_a_candidate_with_a_less_up_to_date_log():
    st = MemoryStorage()
    st.append([Entry(1, 1), Entry(2, 2)])
    n = RawNode(Config(id=3, peers=[1, 2, 3], pre_vote=False, rand=random.Random(0)), st)
    # older last term, longer log: denied
    n.step(Message(MT.VOTE, frm=1, to=3, term=3, index=5, log_term=1))
    # same last term, shorter log: denied
    n.step(Message(MT.VOTE, frm=1, to=3, term=4, index=1, log_term=2))
    # same last term, same length: granted
    n.step(Message(MT.VOTE, frm=2, to=3, term=5, index=2, log_term=2))
    rd = n.ready()
    assert [(m.to, m.term, m.reject) for m in rd.persisted_messages] == [(1, 3, True), (1, 4, True), (2, 5, False)]


def test_5_4_1_planted_bug_grants_the_out_of_date_vote():
    st = MemoryStorage()
    st.append([Entry(1, 1), Entry(2, 2)])
    cfg = Config(id=3, peers=[1, 2, 3], pre_vote=False, testing_bugs=frozenset({faults.VOTE_WITHOUT_LOG_CHECK}))
    n = RawNode(cfg, st)
    n.step(Message(MT.VOTE, frm=1, to=3, term=3, index=5, log_term=1))
    assert [m.reject for m in n.ready().persisted_messages] == [False]


def test_9_6_prevote_does_not_bump_terms_of_a_partitioned_node():
    c = Cluster(3, pre_vote=True)
    c.campaign(1)
    c.isolate(3)
    c.tick(3, n=100)
    r3 = c.raft(3)
    assert r3.term == 1 and r3.state == StateRole.PRE_CANDIDATE
    c.heal()
    c.tick(n=5)
    # the rejoining node did not depose the leader
    assert c.leader() == 1 and c.raft(1).term == 1


def test_9_6_without_prevote_a_rejoining_node_disrupts_the_leader():
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.campaign(1)
    c.isolate(3)
    c.tick(3, n=100)
    assert c.raft(3).term > 1
    c.heal()
    c.tick(n=30)
    assert c.raft(1).term > 1  # the contrast that motivates §9.6


def test_9_6_prevote_grants_when_log_is_up_to_date_and_election_then_proceeds():
    c = Cluster(3, pre_vote=True)
    c.campaign(1)
    sent = [m.type for m in c.delivered]
    assert MT.PRE_VOTE in sent and MT.VOTE in sent
    assert sent.index(MT.PRE_VOTE) < sent.index(MT.VOTE)


def test_check_quorum_leader_steps_down_within_an_election_timeout():
    c = Cluster(3, check_quorum=True)
    c.campaign(1)
    c.isolate(1)
    r = c.raft(1)
    for t in range(2 * r.election_timeout + 1):  # noqa: B007 (t is read after the loop)
        c.tick(1)
        if r.state != StateRole.LEADER:
            break
    assert r.state == StateRole.FOLLOWER
    assert t <= 2 * r.election_timeout


def test_check_quorum_leader_lease_ignores_votes_while_a_leader_is_heard():
    c = Cluster(3, check_quorum=True, pre_vote=False)
    c.campaign(1)
    n3 = c.nodes[3]
    n3.step(Message(MT.VOTE, frm=2, to=3, term=2, index=10, log_term=5))
    assert c.raft(3).term == 1 and not n3.raft.msgs


def test_higher_term_message_makes_leader_step_down():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.nodes[1].step(Message(MT.APPEND_RESP, frm=2, to=1, term=7, index=0))
    r = c.raft(1)
    assert r.state == StateRole.FOLLOWER and r.term == 7 and r.lead == 0


# -- vote requests are resent (§5.1: "servers retry RPCs if they do not receive a response in a
#    timely manner"); etcd waits a whole new election timeout instead ------------------------------


def _leader_1_crashed(timeouts: dict[int, int]) -> Cluster:
    """Leader 1 elected, then crashed; the survivors' randomized timeouts pinned to `timeouts`."""
    c = Cluster(3, pre_vote=True, check_quorum=True)
    c.campaign(1)
    c.crash(1)
    for i, t in timeouts.items():
        c.raft(i).randomized_election_timeout = t
    return c


def test_lost_prevote_request_is_resent_on_the_next_heartbeat_tick():
    c = _leader_1_crashed({2: 10, 3: 19})
    r2 = c.raft(2)
    c.cut(2, 3)  # the first pre-vote request from 2 is lost
    ticks = 0
    while r2.state == StateRole.FOLLOWER:
        c.tick()
        ticks += 1
    assert r2.state == StateRole.PRE_CANDIDATE and ticks == 10
    c.heal()
    c.tick()  # one heartbeat interval later, not a whole election timeout
    assert c.leader() == 2 and r2.term == 2
    assert c.raft(3).lead == 2


def test_prevote_ignored_inside_the_voters_lease_wins_once_the_lease_runs_out():
    # 2's clock runs one tick ahead of 3's (tick phase): when 2 times out, 3 last heard
    # the leader 9 ticks ago, inside its lease, and ignores the pre-vote (thesis §4.2.3)
    c = _leader_1_crashed({2: 10, 3: 19})
    r2, r3 = c.raft(2), c.raft(3)
    c.tick(2)
    while r2.state == StateRole.FOLLOWER:
        c.tick()
    assert r3.election_elapsed == r3.election_timeout - 1 and r3.term == 1  # ignored
    c.tick()  # 3's lease has run out and the request comes again
    assert c.leader() == 2


def test_resent_requests_go_only_to_voters_that_have_not_answered_and_after_the_vote_is_durable():
    n = single(id=1, peers=(1, 2, 3, 4, 5), pre_vote=False)
    n.campaign()
    first = drain(n)
    assert sorted(m.to for m in first.persisted_messages if m.type == MT.VOTE) == [2, 3, 4, 5]
    n.step(Message(MT.VOTE_RESP, frm=2, to=1, term=1, reject=True))
    n.step(Message(MT.VOTE_RESP, frm=3, to=1, term=1))
    n.tick()
    rd = n.ready()
    assert not [m for m in rd.messages if m.type == MT.VOTE]  # like the first ones: after the fsync
    again = [m for m in rd.persisted_messages if m.type == MT.VOTE]
    assert sorted(m.to for m in again) == [4, 5]
    assert all(m.term == 1 and m.index == first.persisted_messages[0].index for m in again)
    n.advance(rd)


def test_resent_transfer_vote_keeps_its_lease_override():
    c = Cluster(3, pre_vote=True, check_quorum=True)
    c.campaign(1)
    n2 = c.nodes[2]
    n2.step(Message(MT.TIMEOUT_NOW, frm=1, to=2, term=1))
    drain(n2)
    n2.tick()
    again = [m for m in n2.ready().persisted_messages if m.type == MT.VOTE]
    assert sorted(m.to for m in again) == [1, 3]
    assert all(m.context == b"CampaignTransfer" for m in again)
