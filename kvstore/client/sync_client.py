"""The blocking client: an AsyncClient driven on a private event-loop thread.

Why not sync gRPC channels: one implementation of redirects, retries,
exactly-once sessions and balancing instead of two that drift apart; and calls
made from many threads at once meet on one loop, where the coalescer turns
them into Batch RPCs (16 threads each doing a put cost about one round trip,
not sixteen). The price is one thread hand-off per call (tens of
microseconds), small next to a replicated write.

The hand-off is built for many threads. Calls go into one queue, and only a
call that finds no drain already scheduled wakes the loop
(call_soon_threadsafe): the loop then takes every call queued meanwhile in
one turn, so they also leave in one batch. A put or get (coalescing on, no
per-call timeout) is added to the coalescer directly, with no task; its
future's done callback wakes the caller (see _Wakeup), and the caller converts
the answer itself, off the loop thread. The loop thread is the one every
call goes through, so the less it does per call, the more threads it serves.

Thread-safe: any number of threads may share one Client.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from typing import Any, TypeVar
from collections.abc import Coroutine, Iterable, Iterator, Sequence

from kvstore.client import errors
from kvstore.client.async_client import AsyncClient
from kvstore.client.auth_admin import AUTH_ADMIN_METHODS
from kvstore.client.balancer import Balancer
from kvstore.client.election import SyncElection
from kvstore.client.lease import LeaseGrant, LeaseTimeToLive, SyncLease
from kvstore.client.lock import SyncLock
from kvstore.client.retry import RetryPolicy
from kvstore.client.txn import Txn
from kvstore.client.watch import WatchEvent, WatchPosition
from kvstore.client.types import (
    BytesLike,
    DeleteResult,
    GetResult,
    Member,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
)
from kvstore.v1 import kv_pb2

__all__ = ["Client"]

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.new_event_loop()


class _Wakeup:
    """One thread's wake-up call: an eventfd (a pipe where there is none).

    Why not a lock: releasing a threading.Lock wakes the waiting thread with
    the GIL held, so on a busy machine the woken thread preempts the loop
    thread only to find the GIL taken and sleep again (measured with 32
    threads: 4.2 context switches per call; 1.8 with this). Writing to an
    eventfd lets go of the GIL during the syscall: the woken thread runs.
    """

    __slots__ = ("_r", "_w")

    def __init__(self) -> None:
        self._r = self._w = -1  # __del__ runs even if no descriptor could be made
        if hasattr(os, "eventfd"):
            self._r = self._w = os.eventfd(0, os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._r, self._w = os.pipe()

    def set(self) -> None:
        """Wake the thread (once per wait: its read takes the eventfd's count, or the pipe's 8 bytes)."""
        os.write(self._w, b"\x01\0\0\0\0\0\0\0")

    def wait(self) -> None:
        os.read(self._r, 8)

    def __del__(self) -> None:
        for fd in {self._r, self._w}:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:  # pragma: no cover - nothing to do about it
                    pass


class _LockWakeup:
    """_Wakeup's stand-in where this process has no file descriptor to spare (EMFILE)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()


_per_thread = threading.local()


def _my_wakeup() -> _Wakeup | _LockWakeup:
    """The calling thread's wake-up call (one per thread, closed when the thread ends)."""
    w: _Wakeup | _LockWakeup | None = getattr(_per_thread, "wakeup", None)
    if w is None:
        try:
            w = _Wakeup()
        except OSError:  # out of descriptors (thousands of threads): a lock does the same, slower
            w = _LockWakeup()
        _per_thread.wakeup = w
    return w


class _Call:
    """One blocking call's hand-off to the loop thread and back.

    Cheaper than run_coroutine_threadsafe + concurrent.futures.Future (about
    9 vs 16 us a round on this machine): the caller waits on its thread's
    _Wakeup alone, and no future is chained across threads.
    """

    __slots__ = ("coro", "finished", "task", "result", "error")

    def __init__(self, coro: Coroutine[Any, Any, Any], finished: _Wakeup | _LockWakeup) -> None:
        self.coro = coro
        self.finished = finished  # set by _done, on the loop thread
        self.task: asyncio.Task[Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None

    def start(self) -> None:
        try:
            self.task = asyncio.get_running_loop().create_task(self.coro)
        except BaseException as e:  # never leave the caller blocked (nor the calls queued after it)
            self.coro.close()
            self.error = e
            self.finished.set()
            return
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.error = errors.Cancelled("call cancelled (client closing)")
        elif (exc := task.exception()) is not None:
            self.error = exc
        else:
            self.result = task.result()
        self.finished.set()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def outcome(self) -> Any:
        if self.error is not None:
            error, self.error = self.error, None  # no reference cycle through the traceback
            raise error
        return self.result


class _Soon:
    """One blocking put or get handed to the loop as a coalescer op, with no task.

    ``start`` (on the loop) adds the op and hooks the caller's _Wakeup to its
    future; the caller reads the future once woken.
    """

    __slots__ = ("add", "args", "finished", "fut", "error")

    def __init__(self, add: Any, args: tuple[Any, ...], finished: _Wakeup | _LockWakeup) -> None:
        self.add = add  # AsyncClient.put_soon or get_soon
        self.args = args
        self.finished = finished  # set by _done, on the loop thread
        self.fut: asyncio.Future[Any] | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        try:
            fut = self.fut = self.add(*self.args)
        except BaseException as e:  # bad arguments: the caller raises it
            self.error = e
            self.finished.set()
            return
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.finished.set()

    def cancel(self) -> None:
        if self.fut is not None:
            self.fut.cancel()

    def outcome(self) -> Any:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        fut = self.fut
        assert fut is not None and fut.done()
        if fut.cancelled():
            raise errors.Cancelled("call cancelled (client closing)")
        return fut.result()


class Client:
    """Blocking client for a kvstore cluster, with the same methods as AsyncClient.

        with Client() as kv:                 # the local cluster's endpoints
            kv.put("k", "v")
            assert kv.get("k").value == b"v"

    Takes the same keyword arguments as :class:`AsyncClient` (timeout, retry,
    balancer, coalesce, max_batch_ops, ...).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str | None = None,
        *,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        balancer: str | Balancer | None = None,
        coalesce: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.update(timeout=timeout, retry=retry, balancer=balancer, coalesce=coalesce)
        self._loop = _new_loop()
        self._submitted: deque[_Call | _Soon] = deque()  # calls waiting for the loop to start them
        self._drain_due = False  # a _drain is scheduled and has not begun
        self._thread = threading.Thread(target=self._run_loop, name="kvstore-client", daemon=True)
        self._thread.start()
        self._closed = False
        self._close_lock = threading.Lock()

        async def make() -> AsyncClient:
            return AsyncClient(endpoints, **kwargs)

        try:
            self._aclient: AsyncClient = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        self._coalesced = self._aclient.coalescer is not None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and block for its result."""
        if self._closed:
            coro.close()
            raise errors.ClientClosed("client is closed")
        return self._wait(_Call(coro, _my_wakeup()))

    def _wait(self, call: _Call | _Soon) -> Any:
        """Hand ``call`` to the loop and block until it finished; its result (or raise its error)."""
        self._submitted.append(call)
        if not self._drain_due:  # else the drain already scheduled will find it
            self._drain_due = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except BaseException:  # the loop is closed: nothing will drain
                self._drain_due = False
                raise
        try:
            call.finished.wait()
        except KeyboardInterrupt:
            _per_thread.wakeup = None  # the call will still set this one: the thread's next call takes another
            self._loop.call_soon_threadsafe(call.cancel)
            raise
        return call.outcome()

    def _drain(self) -> None:
        """Start every call queued so far (on the loop). The flag drops first: a call queued after
        the last pop below sees it down and schedules the next drain."""
        self._drain_due = False
        submitted = self._submitted
        while submitted:
            submitted.popleft().start()

    def _soon(self, add: Any, args: tuple[Any, ...]) -> Any:
        """A put or get as a coalescer op (see _Soon); ClientClosed once closed."""
        if self._closed:
            raise errors.ClientClosed("client is closed")
        return self._wait(_Soon(add, args, _my_wakeup()))

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending calls, close channels, stop the loop thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            try:
                self._run(self._aclient.close())
            finally:
                self._closed = True
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    def __del__(self) -> None:  # best effort: a forgotten client should not leak its thread
        try:
            if not self._closed and self._loop.is_running():
                self._loop.call_soon_threadsafe(self._loop.stop)
        except Exception:
            pass

    @property
    def endpoints(self) -> list[str]:
        return self._aclient.endpoints

    @property
    def leader(self) -> str | None:
        return self._aclient.leader

    @property
    def async_client(self) -> AsyncClient:
        """The AsyncClient underneath (runs on this client's private loop)."""
        return self._aclient

    # --- KV ----------------------------------------------------------------

    def put(self, key: BytesLike, value: BytesLike, *, prev_kv: bool = False, lease: int = 0,
            timeout: float | None = None) -> PutResult:
        """Set ``key`` to ``value``; ``prev_kv=True`` also returns what it replaced; ``lease``: attach it."""
        if timeout is None and self._coalesced:
            return PutResult.from_pb(self._soon(self._aclient.put_soon, (key, value, prev_kv, lease)))
        return self._run(self._aclient.put(key, value, prev_kv=prev_kv, lease=lease, timeout=timeout))

    def get(self, key: BytesLike, *, serializable: bool = False, revision: int = 0,
            timeout: float | None = None) -> GetResult:
        """One key. Linearizable unless ``serializable=True`` (any member, maybe stale);
        ``revision``: as it was then (0: now)."""
        if timeout is None and self._coalesced:
            return GetResult.from_pb(self._soon(self._aclient.get_soon, (key, serializable, revision)))
        return self._run(self._aclient.get(key, serializable=serializable, revision=revision, timeout=timeout))

    def compact(self, revision: int, *, timeout: float | None = None) -> int:
        """Discard the history below ``revision``; the store's revision after it."""
        return self._run(self._aclient.compact(revision, timeout=timeout))

    def watch(
        self, key: BytesLike, end: BytesLike | None = None, *, prefix: bool = False, start_revision: int = 0,
        prev_kv: bool = False, no_put: bool = False, no_delete: bool = False, progress_notify: bool = False,
        position: WatchPosition | None = None,
    ) -> Iterator[WatchEvent]:
        """``for ev in client.watch(b"cfg/", prefix=True)``: every change from ``start_revision`` on
        (0: from now), in revision order, resumed on another member if one fails. Close the
        generator (or break out of the loop) to end the watch."""
        agen = self._aclient.watch(key, end, prefix=prefix, start_revision=start_revision, prev_kv=prev_kv,
                                   no_put=no_put, no_delete=no_delete, progress_notify=progress_notify,
                                   position=position)
        async def next_event() -> WatchEvent:
            return await agen.__anext__()

        async def close() -> None:
            await agen.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                try:
                    yield self._run(next_event())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(close())

    def range(
        self,
        start: BytesLike,
        end: BytesLike | None = None,
        *,
        prefix: bool = False,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
        revision: int = 0,
        timeout: float | None = None,
    ) -> RangeResult:
        """Keys in ``[start, end)``, or every key starting with ``start`` when ``prefix=True``;
        ``revision``: as they were then (0: now)."""
        return self._run(
            self._aclient.range(
                start, end, prefix=prefix, limit=limit, keys_only=keys_only, count_only=count_only,
                serializable=serializable, revision=revision, timeout=timeout,
            )
        )

    def delete(
        self,
        key: BytesLike,
        end: BytesLike | None = None,
        *,
        prefix: bool = False,
        prev_kv: bool = False,
        timeout: float | None = None,
    ) -> DeleteResult:
        """Delete one key, ``[key, end)``, or a prefix."""
        return self._run(self._aclient.delete(key, end, prefix=prefix, prev_kv=prev_kv, timeout=timeout))

    def txn(
        self,
        txn: Txn | None = None,
        *,
        compare: Iterable[kv_pb2.Compare] = (),
        success: Iterable[Any] = (),
        failure: Iterable[Any] = (),
        timeout: float | None = None,
    ) -> TxnResult:
        """Run a transaction atomically; a failed compare gives ``succeeded=False``."""
        return self._run(
            self._aclient.txn(txn, compare=compare, success=success, failure=failure, timeout=timeout)
        )

    # --- Lease -------------------------------------------------------------

    def lease(self, ttl: int, *, lease_id: int = 0) -> SyncLease:
        """``with c.lease(ttl=10) as lease:`` grants a lease, keeps it alive in the background until the
        block ends, then revokes it. ``lease.lost`` (a threading.Event) is set and ``lease.check()``
        raises LeaseLost once it is lost (see kvstore/client/lease.py)."""
        return SyncLease(self, self._aclient.lease(ttl, lease_id=lease_id))

    def lock(self, name: BytesLike, *, ttl: int = 60, lease: SyncLease | None = None) -> SyncLock:
        """``with c.lock("name", ttl=10) as lock:`` holds lock NAME under a lease kept alive in the
        background (its own of ``ttl`` seconds, or ``lease``, shared as etcd's sessions are);
        ``lock.token`` is its fencing token, ``lock.guard()`` the compare that fences a write:
        ``c.txn(Txn().when(lock.guard()).then(put(k, v)))`` (kvstore/client/lock.py)."""
        return SyncLock(self, self._aclient.lock(name, ttl=ttl, lease=None if lease is None else lease.lease))

    def election(self, name: BytesLike, *, ttl: int = 60, lease: SyncLease | None = None) -> SyncElection:
        """Election NAME: campaign, proclaim, leader, observe, resign (kvstore/client/election.py)."""
        return SyncElection(self, self._aclient.election(name, ttl=ttl, lease=None if lease is None else lease.lease))

    def lease_grant(self, ttl: int, *, lease_id: int = 0, timeout: float | None = None) -> LeaseGrant:
        return self._run(self._aclient.lease_grant(ttl, lease_id=lease_id, timeout=timeout))

    def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> int:
        return self._run(self._aclient.lease_revoke(lease_id, timeout=timeout))

    def lease_keep_alive_once(self, lease_id: int, *, timeout: float | None = None) -> int:
        """One keep-alive; the new TTL, 0 if the lease no longer exists."""
        return int(self._run(self._aclient.lease_keep_alive_once(lease_id, timeout=timeout)).TTL)

    def lease_time_to_live(self, lease_id: int, *, keys: bool = False, timeout: float | None = None
                           ) -> LeaseTimeToLive:
        return self._run(self._aclient.lease_time_to_live(lease_id, keys=keys, timeout=timeout))

    def leases(self, *, timeout: float | None = None) -> list[int]:
        return self._run(self._aclient.leases(timeout=timeout))

    # --- Cluster -----------------------------------------------------------

    def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> MemberStatus:
        """Status of ``endpoint``, or of the leader (else whichever member answers)."""
        return self._run(self._aclient.status(endpoint, timeout=timeout))

    def status_all(self, *, timeout: float | None = None) -> dict[str, MemberStatus | errors.KvstoreError]:
        """Status of every known member; a member that fails maps to its error."""
        return self._run(self._aclient.status_all(timeout=timeout))

    def hash_kv(self, index: int = 0, endpoint: str | None = None, *, timeout: float | None = None):
        """A member's key/value hash at a hash barrier (see AsyncClient.hash_kv): (address, response)."""
        return self._run(self._aclient.hash_kv(index, endpoint, timeout=timeout))

    def alarms(self, disarm: bool = False, member_id: int = 0, alarm: str = "", *,
               timeout: float | None = None) -> list[tuple[int, str]]:
        """The active alarms (see AsyncClient.alarms)."""
        return self._run(self._aclient.alarms(disarm, member_id, alarm, timeout=timeout))

    def members(self, *, timeout: float | None = None) -> list[Member]:
        return self._run(self._aclient.members(timeout=timeout))

    def member_add(self, peer_urls: list[str], client_urls: list[str] | None = None, *, learner: bool = False,
                   name: str = "", timeout: float | None = None) -> tuple[Member, list[Member]]:
        """Add a member (a learner with ``learner``); (the new member with its id, every member after)."""
        return self._run(self._aclient.member_add(peer_urls, client_urls, learner=learner, name=name, timeout=timeout))

    def member_remove(self, member_id: int, *, timeout: float | None = None) -> list[Member]:
        return self._run(self._aclient.member_remove(member_id, timeout=timeout))

    def member_promote(self, member_id: int, *, timeout: float | None = None) -> list[Member]:
        return self._run(self._aclient.member_promote(member_id, timeout=timeout))

    def member_update(self, member_id: int, peer_urls: list[str], *, timeout: float | None = None) -> list[Member]:
        return self._run(self._aclient.member_update(member_id, peer_urls, timeout=timeout))

    def transfer_leader(self, target: int = 0, *, timeout: float | None = None) -> int:
        """Hand leadership to member ``target`` (0: the best other member); returns the new leader id."""
        return self._run(self._aclient.transfer_leader(target, timeout=timeout))


def _blocking(name: str) -> Any:
    """Client.<name>: AsyncClient.<name> run on the client's loop."""
    async_method = getattr(AsyncClient, name)

    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._aclient, name)(*args, **kwargs))

    method.__name__ = name
    method.__doc__ = async_method.__doc__
    return method


for _name in AUTH_ADMIN_METHODS:  # auth_enable, user_add, role_grant_permission, ... (auth_admin.py)
    setattr(Client, _name, _blocking(_name))
