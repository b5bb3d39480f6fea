"""Distributed locks with fencing tokens (etcd's concurrency.Mutex recipe).

    with c.lock("jobs/nightly", ttl=10) as lock:
        c.txn(Txn().when(lock.guard()).then(put("jobs/nightly/state", "done")))   # a fenced write

Acquiring: under a lease (its own, or one given), the holder-to-be creates
NAME/<lease id in hex> and is the holder once no key under NAME/ was created
before it. Meanwhile it WATCHES the newest key created before its own (its
predecessor) until that is deleted, then looks again: no polling, and one
release wakes one waiter. A holder that dies releases through its lease's
expiry (its key is deleted with the lease).

Fencing. `lock.token` is the revision at which the lock was acquired (the
create revision of its key): it increases strictly with every acquisition.
A lock is no protection against a holder that was paused or cut off past its
lease and still believes it holds it; `lock.guard()` is the txn compare "the
lock key still exists with this create revision", so a write made under it is
refused once the lock has passed to anyone else. Resources outside the store
should reject a token lower than one they have seen.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from kvstore.client import errors
from kvstore.client.lease import Lease
from kvstore.client.txn import Txn, create_revision, get, put
from kvstore.client.types import BytesLike, KeyValue, to_bytes
from kvstore.v1 import kv_pb2

if TYPE_CHECKING:
    from kvstore.client.async_client import AsyncClient

__all__ = ["Lock", "SyncLock", "queue_up", "wait_for_predecessors", "wait_while_held"]


async def queue_up(client: AsyncClient, prefix: bytes, lease: Lease, value: bytes = b"") -> tuple[bytes, int, bool]:
    """Create prefix + <lease id hex> under the lease unless it exists: (key, its create revision, created)."""
    key = prefix + f"{lease.id:x}".encode()
    r = await client.txn(Txn().when(create_revision(key) == 0).then(put(key, value, lease=lease.id))
                         .otherwise(get(key)))
    if r.succeeded:
        return key, r.revision, True
    existing = r.responses[0].kvs[0]  # type: ignore[union-attr]  # the compare failed: the txn's get sees it
    return key, existing.create_revision, False


async def wait_for_predecessors(client: AsyncClient, prefix: bytes, my_revision: int) -> None:
    """Return once no key under prefix was created before my_revision: each time, watch the newest
    such key (the one just ahead) until it is deleted."""
    while True:
        rr = await client.range(prefix, prefix=True, keys_only=True)
        ahead = [kv for kv in rr.kvs if kv.create_revision < my_revision]
        if not ahead:
            return
        last = max(ahead, key=lambda kv: kv.create_revision)
        async for ev in client.watch(last.key, start_revision=rr.revision + 1, no_put=True):
            if ev.type == "DELETE":
                break


async def wait_while_held(lease: Lease, client: AsyncClient, prefix: bytes, my_revision: int) -> None:
    """wait_for_predecessors, given up with LeaseLost as soon as the lease is lost (its key is gone)."""
    waiting = asyncio.ensure_future(wait_for_predecessors(client, prefix, my_revision))
    lost = asyncio.ensure_future(lease.lost.wait())
    try:
        await asyncio.wait({waiting, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, lost):
            if not task.done():
                task.cancel()
    if not waiting.done() or waiting.cancelled():
        raise errors.LeaseLost(f"{prefix!r}: the lease was lost while waiting ({lease.why_lost})")
    waiting.result()  # its error, if it failed


async def owner(client: AsyncClient, prefix: bytes) -> KeyValue | None:
    """The key under prefix created first (the holder, or the leader), or None."""
    rr = await client.range(prefix, prefix=True)
    return min(rr.kvs, key=lambda kv: kv.create_revision) if rr.kvs else None


class Lock:
    """An etcd-recipe lock under NAME, held from `acquire` (or `async with`) until `release`."""

    def __init__(self, client: AsyncClient, name: BytesLike, *, ttl: int = 60, lease: Lease | None = None) -> None:
        self._client = client
        self.prefix = to_bytes(name) + b"/"
        self._ttl = ttl
        self.lease = lease
        self._own_lease = lease is None
        self.key = b""
        self.token = 0  # the fencing token: the revision at which the lock was acquired

    def guard(self) -> kv_pb2.Compare:
        """The txn compare that holds only while this acquisition still holds the lock."""
        if not self.token:
            raise errors.KvstoreError("the lock is not held")
        return create_revision(self.key) == self.token

    async def acquire(self, timeout: float | None = None) -> Lock:
        """Wait (without polling) until the lock is ours; DeadlineExceeded after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._acquire(), timeout)
        except TimeoutError:
            await self._abandon()
            raise errors.DeadlineExceeded(0, {"lock": f"{self.prefix!r} still held by another"},
                                          timeout=timeout or 0.0) from None
        except BaseException:
            await self._abandon()
            raise
        return self

    async def _acquire(self) -> None:
        if self.lease is None:
            self.lease = self._client.lease(self._ttl)
            await self.lease.__aenter__()
        self.key, rev, _ = await queue_up(self._client, self.prefix, self.lease)
        await wait_while_held(self.lease, self._client, self.prefix, rev)
        mine = (await self._client.get(self.key)).kv
        if mine is None or mine.create_revision != rev:  # our lease ran out while we waited
            raise errors.LeaseLost(f"lock {self.prefix!r}: the lease ran out while waiting")
        self.lease.check()
        self.token = rev

    async def release(self) -> None:
        """Give the lock up: delete its key (only our lease's id names it, so this never removes
        another's); errors are raised only while the lease still holds."""
        self.token = 0
        try:
            if self.key:
                try:
                    await self._client.delete(self.key)
                except errors.KvstoreError:
                    if self.lease is None or not self.lease.lost.is_set():
                        raise  # else its key goes (or went) with the lease
        finally:
            self.key = b""
            if self._own_lease and self.lease is not None:
                lease, self.lease = self.lease, None
                await lease.close()

    async def _abandon(self) -> None:
        try:
            await asyncio.shield(self.release())
        except errors.KvstoreError:
            pass  # the key goes with the lease

    async def __aenter__(self) -> Lock:
        return await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class SyncLock:
    """The blocking face of Lock, for Client.lock(); the lease is kept alive on the client's loop."""

    def __init__(self, client, lock: Lock) -> None:  # client: the blocking Client
        self._client = client
        self._lock = lock

    @property
    def token(self) -> int:
        return self._lock.token

    @property
    def key(self) -> bytes:
        return self._lock.key

    @property
    def lease(self) -> Lease | None:
        return self._lock.lease

    def guard(self) -> kv_pb2.Compare:
        return self._lock.guard()

    def acquire(self, timeout: float | None = None) -> SyncLock:
        self._client._run(self._lock.acquire(timeout))
        return self

    def release(self) -> None:
        self._client._run(self._lock.release())

    def __enter__(self) -> SyncLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
