"""Tuning knobs of one Raft node. Time is in ticks; randomness is injected."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .faults import check
from .types import ConfState


@dataclass
class Config:
    id: int
    peers: list[int]
    election_tick: int = 10  # followers campaign after a random timeout in [election_tick, 2*election_tick)
    heartbeat_tick: int = 1
    max_size_per_msg: int = 1 << 20  # bytes of entries per AppendEntries (at least one entry)
    max_inflight_msgs: int = 256  # pipelined appends per follower before waiting for acks
    max_uncommitted_size: int = 0  # bytes of proposals not yet committed; 0 = unlimited
    pre_vote: bool = True  # thesis §9.6
    check_quorum: bool = True  # a leader that hears from no quorum for an election timeout steps down
    applied: int = 0  # the state machine's applied index on restart
    # the membership as of `applied`, kept by the state machine (conf changes applied after the
    # storage's snapshot are not replayed to raft); None: the storage's snapshot, else `peers`
    conf_state: ConfState | None = None
    # a learner is promoted only when at most this many entries behind the leader's log
    max_learner_lag: int = 1000
    rand: random.Random | None = None
    # test-only: planted bugs from kvstore.raft.faults; never set outside tests
    testing_bugs: frozenset[str] = field(default_factory=frozenset)

    def validate(self) -> None:
        if self.id <= 0:
            raise ValueError("id must be > 0 (0 means 'none')")
        if self.heartbeat_tick <= 0:
            raise ValueError("heartbeat_tick must be > 0")
        if self.election_tick <= self.heartbeat_tick:
            raise ValueError("election_tick must be greater than heartbeat_tick")
        if self.max_inflight_msgs <= 0:
            raise ValueError("max_inflight_msgs must be > 0")
        if self.max_size_per_msg <= 0:
            raise ValueError("max_size_per_msg must be > 0")
        if self.max_learner_lag < 0:
            raise ValueError("max_learner_lag must be >= 0")
        if self.max_uncommitted_size < 0:
            raise ValueError("max_uncommitted_size must be >= 0")
        self.testing_bugs = check(self.testing_bugs)
