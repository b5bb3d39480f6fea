"""Leases on the client: results, and a lease kept alive in the background.

    async with ac.lease(ttl=10) as lease:        # AsyncClient
        await ac.put("svc/a", "addr", lease=lease.id)
        ...
        lease.check()                           # raises LeaseLost once it is lost

    with c.lease(ttl=10) as lease:               # Client (blocking)
        c.put("svc/a", "addr", lease=lease.id)

When is a lease lost? When a keep-alive is answered "no such lease" (it
expired or was revoked), or when its local deadline passes: the time the last
answered keep-alive was SENT plus the TTL. The cluster never expires a lease
before that moment (its clock starts after the send), so until then the keys
are certainly there; after it, they may be gone. A lost lease stays lost: its
keep-alives stop, `alive` turns False, `lost` is set, callbacks given to
`on_lost` run (on the client's event loop), and `check()` raises LeaseLost.
Leaving the block stops the keep-alives and revokes the lease (its keys go).
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from kvstore.client import errors
from kvstore.v1 import lease_pb2

if TYPE_CHECKING:
    from kvstore.client.async_client import AsyncClient

log = logging.getLogger("kvstore.client.lease")

__all__ = ["LeaseGrant", "LeaseTimeToLive", "Lease", "SyncLease"]

GONE = "the cluster has no such lease"  # how a loss the cluster reported begins (Lease.why_lost)


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    id: int
    ttl: int  # seconds granted (the cluster raises a short TTL to its minimum)


@dataclass(frozen=True, slots=True)
class LeaseTimeToLive:
    id: int
    ttl: int  # seconds left; -1: no such lease
    granted_ttl: int
    keys: list[bytes] = field(default_factory=list)


class Lease:
    """A lease granted and kept alive by an AsyncClient until the block ends (see the module doc)."""

    def __init__(self, client: AsyncClient, ttl: int, lease_id: int = 0) -> None:
        self._client = client
        self._asked_ttl = ttl
        # Chosen here, so that a grant retried after a lost answer is recognised as ours.
        self.id = lease_id or random.getrandbits(62) + 1
        self.ttl = ttl
        self.deadline = 0.0  # loop.time() before which the lease certainly holds
        self.lost = asyncio.Event()
        self.why_lost = ""
        self._callbacks: list[Callable[[Lease], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._chose_id = not lease_id

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and asyncio.get_running_loop().time() < self.deadline

    def check(self) -> None:
        """Raise LeaseLost if the lease is lost (or its deadline has passed)."""
        if self.lost.is_set() or asyncio.get_running_loop().time() >= self.deadline:
            raise errors.LeaseLost(f"lease {self.id} lost: {self.why_lost or 'its TTL ran out'}")

    def on_lost(self, callback: Callable[[Lease], None]) -> None:
        """Call `callback(lease)` once the lease is lost (at once if it already is)."""
        if self.lost.is_set():
            callback(self)
        else:
            self._callbacks.append(callback)

    async def __aenter__(self) -> Lease:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            granted = await self._client.lease_grant(self._asked_ttl, lease_id=self.id)
        except errors.FailedPrecondition:
            if not self._chose_id:
                raise
            # "already exists": a retry of our own grant whose first answer was lost (62 random bits)
            granted = LeaseGrant(self.id, max(self._asked_ttl, 1))
        self.ttl = granted.ttl
        self.deadline = sent + granted.ttl
        self._task = loop.create_task(self._keep_alive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stop_keep_alive(self) -> None:
        """Stop renewing without revoking: the lease runs out by itself within its TTL (as a holder
        that stopped would let it; the lock tests use it to strand a holder)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def close(self) -> None:
        """Stop the keep-alives and revoke the lease (a lease already gone is fine)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.why_lost.startswith(GONE):
            return  # the cluster said so: nothing to revoke
        self._lose("closed", quiet=True)
        try:  # also when lost only here (its deadline passed): the cluster may still hold it
            await self._client.lease_revoke(self.id, timeout=min(self._client.timeout, self.ttl))
        except errors.NotFound:
            pass
        except errors.KvstoreError as e:  # it expires by itself
            log.info("revoking lease %d on close failed (it expires within its TTL): %s", self.id, e)

    def _lose(self, why: str, quiet: bool = False) -> None:
        if self.lost.is_set():
            return
        self.why_lost = why
        self.lost.set()
        if not quiet:  # the caller hears of it through lost, check() and on_lost, not the log
            log.info("lease %d lost: %s", self.id, why)
            for cb in self._callbacks:
                try:
                    cb(self)
                except Exception:
                    log.exception("a lease-lost callback failed")

    def _answered(self, sent: float, resp: lease_pb2.LeaseKeepAliveResponse) -> bool:
        """Take a keep-alive answer; False once the lease is lost."""
        if resp.TTL <= 0:
            self._lose(f"{GONE} (it expired or was revoked)")
            return False
        if asyncio.get_running_loop().time() >= self.deadline:
            self._lose("its TTL ran out before a keep-alive was answered")  # stays lost, whatever comes late
            return False
        self.deadline = max(self.deadline, sent + resp.TTL)
        return True

    async def _keep_alive(self) -> None:
        """Every TTL/3: one keep-alive on a stream to the leader; on any failure, one through the
        retrying call path (which finds the leader), then a new stream there."""
        loop = asyncio.get_running_loop()
        client = self._client
        req = lease_pb2.LeaseKeepAliveRequest(ID=self.id)
        interval = max(self.ttl / 3, 0.1)
        wait = interval
        call = None
        try:
            while True:
                await asyncio.sleep(min(wait, max(0.0, self.deadline - loop.time())))
                wait = interval
                left = self.deadline - loop.time()
                if left <= 0:
                    self._lose("its TTL ran out before a keep-alive was answered")
                    return
                sent = loop.time()
                try:
                    if call is None:
                        call = client.open_keep_alive_stream()
                    await asyncio.wait_for(call.write(req), left)
                    resp = await asyncio.wait_for(call.read(), left)
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("the keep-alive stream ended")
                except Exception as e:  # a broken stream, whatever its error: try the retrying path
                    if call is not None:
                        call.cancel()
                        call = None
                    log.debug("lease %d keep-alive stream failed (%s); trying through the leader", self.id, e)
                    sent = loop.time()
                    try:
                        resp = await client.lease_keep_alive_once(self.id, timeout=max(0.05, self.deadline - sent))
                    except Exception as e2:  # not answered in time (or at all): soon again, until the deadline
                        log.debug("lease %d keep-alive failed: %s", self.id, e2)
                        wait = min(interval, 0.25)  # soon again, until the deadline
                        continue
                if not self._answered(sent, resp):
                    return
        except Exception as e:  # a bug here must not leave a lease silently unrenewed
            self._lose(f"its keep-alives stopped: {e!r}")
            raise
        finally:
            if call is not None:
                call.cancel()


class SyncLease:
    """The blocking face of Lease, for Client.lease(); the keep-alives run on the client's loop."""

    def __init__(self, client, lease: Lease) -> None:  # client: the blocking Client
        self._client = client
        self._lease = lease
        self.lost = threading.Event()  # set once the lease is lost
        lease.on_lost(lambda _lease: self.lost.set())

    @property
    def id(self) -> int:
        return self._lease.id

    @property
    def lease(self) -> Lease:
        """The Lease underneath (runs on the client's loop)."""
        return self._lease

    @property
    def ttl(self) -> int:
        return self._lease.ttl

    @property
    def why_lost(self) -> str:
        return self._lease.why_lost

    @property
    def alive(self) -> bool:
        return self._client._run(_alive(self._lease))

    def check(self) -> None:
        """Raise LeaseLost if the lease is lost (or its deadline has passed)."""
        self._client._run(_check(self._lease))

    def on_lost(self, callback: Callable[[Lease], None]) -> None:
        """Call `callback(lease)` once the lease is lost; it runs on the client's loop thread: keep it short."""
        self._lease.on_lost(callback)

    def __enter__(self) -> SyncLease:
        self._client._run(self._lease.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client._run(self._lease.close())


async def _alive(lease: Lease) -> bool:
    return lease.alive


async def _check(lease: Lease) -> None:
    lease.check()
