"""The client follows MemberList: new members' endpoints are learned, removed members' are dropped."""
from __future__ import annotations

from kvstore.client.endpoints import Endpoints
from kvstore.v1 import cluster_pb2


def listing(*members: tuple[int, str], leader: int = 0) -> cluster_pb2.MemberListResponse:
    return cluster_pb2.MemberListResponse(
        members=[cluster_pb2.Member(id=i, client_urls=[addr]) for i, addr in members], leader_id=leader)


def test_new_members_are_learned_and_removed_ones_dropped():
    eps = Endpoints(["h1:1", "h2:1", "h3:1"])
    eps.update(listing((1, "h1:1"), (2, "h2:1"), (3, "http://h3:1"), leader=3))
    assert eps.leader == "h3:1"
    eps.update(listing((1, "h1:1"), (2, "h2:1"), (3, "h3:1"), (4, "h4:1")))  # member 4 added
    assert eps.addrs == ["h1:1", "h2:1", "h3:1", "h4:1"]
    eps.update(listing((1, "h1:1"), (2, "h2:1"), (4, "h4:1")))  # member 3 (the leader) removed
    assert eps.addrs == ["h1:1", "h2:1", "h4:1"] and eps.leader is None and 3 not in eps.ids


def test_an_empty_listing_forgets_nothing():
    eps = Endpoints(["h1:1"])
    eps.update(listing((1, "h1:1")))
    eps.update(listing())
    assert eps.addrs == ["h1:1"]
