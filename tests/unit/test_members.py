"""The member set the state machine records: changed by applied entries only, in their transaction."""
from __future__ import annotations

from kvstore.raft import ConfChange, encode_conf_change
from kvstore.storage.members import MemberSet, attributes
from kvstore.storage.state_machine import StateMachine
from kvstore.v1 import command_pb2

PEERS = {1: "h1:1", 2: "h2:1", 3: "h3:1"}
CLIENTS = {1: "h1:2", 2: "h2:2", 3: "h3:2"}


def conf(kind: int, id: int, ctx: bytes = b"") -> bytes:
    return command_pb2.Command(conf_change=encode_conf_change(ConfChange(kind, id, ctx))).SerializeToString()


def test_changes_follow_the_log_and_survive_a_reopen(tmp_path):
    sm = StateMachine.open(str(tmp_path / "db"), fsync=True)
    assert sm.members is None
    sm.set_members(MemberSet.initial(PEERS, CLIENTS))
    assert sm.set_members(MemberSet.initial({9: "x:1"}, {})).ids == [1, 2, 3]  # only a fresh one takes the flags
    sm.apply([(1, 1, conf(ConfChange.ADD_LEARNER, 4, attributes("n4", ["h4:1"], ["h4:2"])))])
    assert (sm.members.voters, sm.members.learners) == ((1, 2, 3), (4,))
    sm.apply([(2, 1, conf(ConfChange.ADD_NODE, 4)), (3, 1, conf(ConfChange.REMOVE_NODE, 1))])
    update = command_pb2.Command(member_update=command_pb2.MemberUpdate(member_id=2, peer_urls=["h2:9"]))
    sm.apply([(4, 1, update.SerializeToString())])
    m = sm.members
    assert (m.voters, m.learners, m.removed) == ((2, 3, 4), (), (1,))
    assert m.peer_addrs() == {2: "h2:9", 3: "h3:1", 4: "h4:1"} and m.client_addrs()[4] == "h4:2"
    assert m.info[4].name == "n4"
    sm.close()
    sm = StateMachine.open(str(tmp_path / "db"), fsync=True)
    assert sm.members == m and sm.applied_index == 4
    sm.close()


def test_a_replayed_entry_is_not_applied_twice(tmp_path):
    sm = StateMachine.open(str(tmp_path / "db"), fsync=True)
    sm.set_members(MemberSet.initial(PEERS, CLIENTS))
    sm.apply([(1, 1, conf(ConfChange.REMOVE_NODE, 3))])
    sm.apply([(1, 1, conf(ConfChange.REMOVE_NODE, 3)), (2, 1, conf(ConfChange.ADD_LEARNER, 5))])  # WAL replay
    assert (sm.members.voters, sm.members.learners, sm.members.removed) == ((1, 2), (5,), (3,))
    sm.close()


def test_encode_round_trip():
    m = MemberSet.initial(PEERS, CLIENTS, {1: "one"}).after_conf_change(ConfChange(ConfChange.REMOVE_NODE, 2))
    assert MemberSet.decode(m.encode()) == m and m.info[1].name == "one" and 2 not in m.info


def test_own_flags_win_for_peer_addresses_until_the_log_sets_one():
    """A member started with addresses of its own (proxies, NAT) keeps them, even after a snapshot brought
    another member's record; an address the log sets (member add/update) is everyone's."""
    leader_view = MemberSet.initial({1: "p1:1", 2: "p2:1", 3: "p3:1"}, CLIENTS)
    mine = {1: "proxy-to-1:9", 2: "h2:1", 3: "proxy-to-3:9"}
    assert leader_view.peer_addrs(mine) == mine
    changed = leader_view.after_update(3, ["moved3:1"]).after_conf_change(
        ConfChange(ConfChange.ADD_LEARNER, 4, attributes("n4", ["h4:1"], [])))
    assert changed.peer_addrs(mine) == {1: "proxy-to-1:9", 2: "h2:1", 3: "moved3:1", 4: "h4:1"}
    assert MemberSet.decode(changed.encode()) == changed
