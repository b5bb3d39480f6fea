"""Wire form of a ConfChange inside a CONF_CHANGE log entry (opaque to storage)."""
from __future__ import annotations

import struct

from .types import ConfChange, ConfState

_HEAD = struct.Struct(">BQ")


def encode_conf_change(cc: ConfChange) -> bytes:
    return _HEAD.pack(cc.change_type, cc.node_id) + cc.context


def decode_conf_change(data: bytes) -> ConfChange:
    change_type, node_id = _HEAD.unpack_from(data)
    return ConfChange(change_type=change_type, node_id=node_id, context=bytes(data[_HEAD.size :]))


def conf_state_after(cs: ConfState, cc: ConfChange) -> ConfState:
    """The membership `cs` becomes by applying `cc`: what the state machine records at the change's index.

    Computed from the change itself, not from the core's tracker: a follower's
    tracker may already hold a newer membership (a snapshot it received) while
    the application is still applying the entries before it.
    """
    voters = [v for v in cs.voters if v != cc.node_id]
    learners = [v for v in cs.learners if v != cc.node_id]
    if cc.change_type == ConfChange.ADD_NODE:
        voters.append(cc.node_id)
    elif cc.change_type == ConfChange.ADD_LEARNER:
        if cc.node_id in cs.voters:
            return ConfState(sorted(cs.voters), sorted(cs.learners))  # a voter is never demoted
        learners.append(cc.node_id)
    elif cc.change_type != ConfChange.REMOVE_NODE:
        raise ValueError(f"unknown conf change type {cc.change_type}")
    return ConfState(sorted(voters), sorted(learners))
