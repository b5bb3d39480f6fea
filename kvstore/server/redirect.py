"""Leader redirection: what a follower answers instead of serving a request.

The contract the client library relies on: UNAVAILABLE with the message
"not leader: leader is member N at HOST:PORT" and trailing metadata
`kvstore-leader-id` (decimal) and `kvstore-leader-addr` (the leader's client
address), or UNAVAILABLE "no leader" with neither when no leader is known.
Both carry `kvstore-not-applied: 1`: nothing was proposed.
"""
from __future__ import annotations

import grpc

from .errors import LEADER_ADDR_KEY, LEADER_ID_KEY, RequestFailed


def no_leader() -> RequestFailed:
    return RequestFailed(grpc.StatusCode.UNAVAILABLE, "no leader", not_applied=True)


def not_leader(leader_id: int, client_addrs: dict[int, str]) -> RequestFailed:
    """The redirect to member `leader_id` (0 = none known)."""
    addr = client_addrs.get(leader_id)
    if not leader_id or addr is None:
        return no_leader()
    return RequestFailed(
        grpc.StatusCode.UNAVAILABLE,
        f"not leader: leader is member {leader_id} at {addr}",
        not_applied=True,
        metadata=((LEADER_ID_KEY, str(leader_id)), (LEADER_ADDR_KEY, addr)),
    )
