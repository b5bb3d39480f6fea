"""Leader election (etcd's concurrency.Election recipe): campaign, proclaim, leader, observe, resign.

    async with ac.lease(ttl=10) as lease:
        e = ac.election("svc/leader", lease=lease)
        await e.campaign(b"host-a:8080")     # returns once this candidate leads
        await e.proclaim(b"host-a:9090")     # a new value, only while still the leader
        await e.resign()

Candidates queue exactly as lock waiters do (kvstore/client/lock.py): each
puts NAME/<lease id hex> under its lease and leads once no key under NAME/ was
created before its own, waiting on its predecessor's key with a watch. The
leader is the key created first; its value is the leader's proclamation.
A leader that dies is replaced once its lease expires.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING

from kvstore.client import errors
from kvstore.client.lease import Lease
from kvstore.client.lock import owner, queue_up, wait_while_held
from kvstore.client.txn import Txn, create_revision, delete, put
from kvstore.client.types import BytesLike, KeyValue, to_bytes

if TYPE_CHECKING:
    from kvstore.client.async_client import AsyncClient

__all__ = ["Election", "NotElected", "SyncElection"]


class NotElected(errors.FailedPrecondition):
    """Proclaim or resign by a candidate that does not (or no longer) lead."""


class Election:
    def __init__(self, client: AsyncClient, name: BytesLike, *, ttl: int = 60, lease: Lease | None = None) -> None:
        self._client = client
        self.prefix = to_bytes(name) + b"/"
        self._ttl = ttl
        self.lease = lease
        self._own_lease = lease is None
        self.key = b""
        self.revision = 0  # the create revision of our key once we lead

    async def campaign(self, value: BytesLike) -> None:
        """Queue up and return once this candidate leads, with `value` proclaimed."""
        val = to_bytes(value)
        if self.lease is None:
            self.lease = self._client.lease(self._ttl)
            await self.lease.__aenter__()
        try:
            key, rev, created = await queue_up(self._client, self.prefix, self.lease, val)
            self.key, self.revision = key, rev
            if not created:
                await self.proclaim(val)
            await wait_while_held(self.lease, self._client, self.prefix, rev)
            mine = (await self._client.get(key)).kv
            if mine is None or mine.create_revision != rev:
                raise errors.LeaseLost(f"election {self.prefix!r}: the lease ran out while campaigning")
        except BaseException:
            self.revision = 0
            await self._drop_lease()
            raise

    async def proclaim(self, value: BytesLike) -> None:
        """Publish a new value as the leader (NotElected if this candidate is not the leader)."""
        if not self.revision:
            raise NotElected("not campaigning: nothing to proclaim")
        r = await self._client.txn(Txn().when(create_revision(self.key) == self.revision)
                                   .then(put(self.key, value, lease=self.lease.id if self.lease else 0)))
        if not r.succeeded:
            self.revision = 0
            raise NotElected(f"election {self.prefix!r}: no longer the leader")

    async def resign(self) -> None:
        """Stop leading (or campaigning): the next candidate takes over."""
        try:
            if self.revision:
                await self._client.txn(Txn().when(create_revision(self.key) == self.revision).then(delete(self.key)))
        finally:
            self.revision, self.key = 0, b""
            await self._drop_lease()

    async def leader(self) -> KeyValue | None:
        """The leader's key and proclaimed value, or None while nobody leads."""
        return await owner(self._client, self.prefix)

    async def observe(self) -> AsyncGenerator[KeyValue, None]:
        """The leader's key-value now and at every change: a new leader or a new proclamation."""
        client = self._client
        while True:
            rr = await client.range(self.prefix, prefix=True)
            if not rr.kvs:  # nobody: wait for the first candidate
                async for _ev in client.watch(self.prefix, prefix=True, start_revision=rr.revision + 1,
                                              no_delete=True):
                    break
                continue
            lead = min(rr.kvs, key=lambda kv: kv.create_revision)
            yield lead
            async for ev in client.watch(lead.key, start_revision=rr.revision + 1):
                if ev.type == "DELETE":
                    break
                yield ev.kv

    async def _drop_lease(self) -> None:
        if self._own_lease and self.lease is not None:
            lease, self.lease = self.lease, None
            await lease.close()


class SyncElection:
    """The blocking face of Election, for Client.election(); the lease is kept alive on the client's loop."""

    def __init__(self, client, election: Election) -> None:  # client: the blocking Client
        self._client = client
        self._election = election

    @property
    def key(self) -> bytes:
        return self._election.key

    @property
    def revision(self) -> int:
        return self._election.revision

    @property
    def lease(self) -> Lease | None:
        return self._election.lease

    def campaign(self, value: BytesLike) -> None:
        self._client._run(self._election.campaign(value))

    def proclaim(self, value: BytesLike) -> None:
        self._client._run(self._election.proclaim(value))

    def resign(self) -> None:
        self._client._run(self._election.resign())

    def leader(self) -> KeyValue | None:
        return self._client._run(self._election.leader())

    def observe(self) -> Iterator[KeyValue]:
        """The leader's key-value now and at every change (blocks between changes)."""
        events = self._election.observe()
        try:
            while True:
                try:
                    yield self._client._run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._client._run(events.aclose())
