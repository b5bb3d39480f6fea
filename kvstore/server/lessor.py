"""The leader's lease clocks: when each lease expires, keep-alives, and revoking what expired.

Only the leader decides expiry (etcd's "primary lessor"). Its clock is
CLOCK_MONOTONIC, local to it: no member's wall clock is trusted, and expiry
is replicated as a revoke entry, never computed by the others.

  * A leader starts its clocks afresh in each term it leads (etcd's promote):
    every lease gets a full TTL from the moment this member first sees it as
    leader. A client counts its lease's life from when it SENT its last
    acknowledged keep-alive, and a keep-alive is honoured only after a
    ReadIndex round confirmed the leadership (see LeaseService), so whatever a
    previous leader promised ends before the new leader's clock can run out:
    failover never expires a lease early (it may expire late, by up to the
    time the election took).
  * A keep-alive sets the deadline to now + TTL; a lease already past its
    deadline is not renewed (it is being revoked).
  * Followers keep no clocks; a member that stops leading drops its clocks.

Lease checkpointing (etcd's remaining-TTL checkpoints) is not done: a new
leader always grants the full TTL, so a lease that is never kept alive lives
at most TTL + one election per failover. Checkpoints would have to keep two
rules to stay safe: a keep-alive of a checkpointed lease is answered only
once the checkpoint's reset has been applied (else a new leader would use
a remaining TTL older than the renewal), and a new leader reads checkpoints
only after applying the first entry of its term (before that, a reset
committed by its predecessor may not be applied yet).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from kvstore.storage.errors import ApplyError
from kvstore.v1 import command_pb2

from .errors import RequestFailed
from .logs import event

log = logging.getLogger("kvstore.lease")

REVOKE_TIMEOUT_S = 5.0


def min_lease_ttl(tick_ms: int, election_ticks: int) -> int:
    """The shortest TTL granted, in seconds (etcd's: 1.5 election timeouts, rounded up): a shorter
    lease could expire during a leader election that its keep-alives cannot reach."""
    return max(1, math.ceil(1.5 * tick_ms * election_ticks / 1000))


class Lessor:
    """Lease deadlines on the leader; `on_tick` is called from the node's tick loop."""

    def __init__(
        self,
        is_leader: Callable[[], bool],
        term: Callable[[], int],
        leases: Callable[[], dict[int, int]],
        propose_revoke: Callable[[command_pb2.Command, float], Awaitable[object]],
        *,
        testing_deadlines_from_apply: bool = False,
    ) -> None:
        self._is_leader = is_leader
        self._term = term
        self._leases = leases  # the state machine's committed lease list: id -> TTL
        self._propose = propose_revoke
        self._deadlines: dict[int, float] = {}  # lease id -> time.monotonic() deadline
        self._leading_term = 0  # the term the deadlines were set in (0: not leading)
        self._seen: dict[int, int] | None = None  # the lease list the deadlines were last matched with
        self._revoking: dict[int, asyncio.Future] = {}  # lease id -> its revoke under way
        self.revoked = 0  # leases this member revoked because they expired (kvstore_server_lease_expired_total)
        # TESTING ONLY, UNSAFE: every member starts a lease's clock when it first sees it and keeps it
        # on becoming leader, so keep-alives the old leader took are forgotten (expires early).
        self.testing_deadlines_from_apply = testing_deadlines_from_apply

    def on_tick(self) -> None:
        """Start clocks for new leases, forget gone ones, and propose a revoke for each that ran out."""
        now = time.monotonic()
        leading = self._is_leader()
        if not leading and not self.testing_deadlines_from_apply:
            if self._leading_term:
                self._deadlines.clear()
                self._leading_term, self._seen = 0, None
            return
        if leading and self._leading_term != self._term():
            self._leading_term = self._term()
            if not self.testing_deadlines_from_apply:
                self._deadlines, self._seen = {}, None  # promote: every lease gets a full TTL from now
        leases = self._leases()
        if leases is not self._seen:
            deadlines = self._deadlines
            for lease_id, ttl in leases.items():
                if lease_id not in deadlines:
                    deadlines[lease_id] = now + ttl
            for lease_id in [i for i in deadlines if i not in leases]:
                del deadlines[lease_id]
            self._seen = leases
        if not leading:
            return
        for lease_id, deadline in self._deadlines.items():
            if deadline <= now and lease_id not in self._revoking:
                self._revoking[lease_id] = asyncio.ensure_future(self._revoke(lease_id))

    async def _revoke(self, lease_id: int) -> None:
        try:
            cmd = command_pb2.Command(lease=command_pb2.LeaseChange(revoke=lease_id))
            result = await self._propose(cmd, REVOKE_TIMEOUT_S)
            if not isinstance(result, ApplyError):  # NOT_FOUND: revoked meanwhile by a client
                self.revoked += 1
                log.info("lease %d expired and was revoked", lease_id,
                         extra=event("lease-expired", lease=lease_id))
        except RequestFailed as e:  # leadership lost or too slow: the next leader (or tick) tries again
            log.info("revoking expired lease %d failed: %s", lease_id, e.message)
        finally:
            self._revoking.pop(lease_id, None)

    def granted(self, lease_id: int, ttl: int) -> None:
        """A lease this leader granted: its clock starts now."""
        if self._is_leader():
            self._deadlines.setdefault(lease_id, time.monotonic() + ttl)

    def renew(self, lease_id: int) -> int:
        """Keep-alive on the leader (leadership confirmed by the caller): the TTL now running, 0 if
        the lease does not exist or already ran out (a revoke is on its way)."""
        ttl = self._leases().get(lease_id)
        if ttl is None or not self._is_leader():
            return 0
        now = time.monotonic()
        deadline = self._deadlines.get(lease_id)
        if deadline is not None and deadline <= now:
            return 0
        self._deadlines[lease_id] = now + ttl
        return ttl

    def remaining(self, lease_id: int) -> int:
        """Whole seconds left on the leader's clock (the full TTL if its clock has not started yet)."""
        ttl = self._leases().get(lease_id)
        if ttl is None:
            return -1
        deadline = self._deadlines.get(lease_id)
        if deadline is None:
            return ttl
        return max(0, int(deadline - time.monotonic()))
