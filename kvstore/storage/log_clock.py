"""Log time: the replicated clock that expires client sessions.

Every replica must expire a session at the same log position, so the clock
lives in the log, not on any member. It must also not follow one member's
clock: a leader whose wall clock jumps an hour ahead would otherwise expire
every session at once (and a leader's absolute time is not comparable with
the next leader's anyway).

So each Command carries `leader_clock_ms`, its leader's CLOCK_MONOTONIC
reading, which a wall-clock jump does not move. Log time advances only by the
difference between two stamped entries of the same term: one term has one
leader, one process, one monotonic clock. The first stamped entry of a term
only sets that term's baseline; the time between terms is not counted. Log
time therefore never runs ahead of the real time that elapsed while entries
were being proposed (it may lag, after elections, which only keeps sessions
longer), never moves backwards, and an idle cluster's first entry after a
pause counts the pause, as long as the leader did not change.

The state is (log_time_ms, term, mark): the clock reading and the term and
stamp of the last stamped entry. It is stored with the applied index, so a
replay after a restart or a snapshot install resumes it exactly.
"""
from __future__ import annotations

from typing import NamedTuple


class LogClock(NamedTuple):
    log_time_ms: int = 0
    term: int = 0  # term of the last stamped entry (0: none yet)
    mark: int = 0  # that entry's leader_clock_ms

    def advance(self, term: int, stamp: int) -> LogClock:
        """The clock after an entry of `term` stamped `stamp` (0: not stamped)."""
        if not stamp:
            return self
        if term != self.term:
            return LogClock(self.log_time_ms, term, stamp)  # a new leader: a new baseline
        if stamp <= self.mark:
            return self
        return LogClock(self.log_time_ms + stamp - self.mark, term, stamp)
