"""Client side of Watch: events of a key or range, in revision order, across member failures.

`watch_events` keeps one watch open on one member at a time. When the stream
breaks (the member died, restarted or was cut off) it opens the watch again
on the next member from the revision after the last one it delivered (or
after the last progress revision the member reported), so the caller sees
every revision once, in order, whichever members served them. A member that
has not yet applied that revision holds the watch until it has.

A watch whose next revision has been compacted away ends with
`WatchCompacted` (its `compact_revision` says where history now starts);
the caller decides whether to re-read the state and watch from there.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from kvstore.client import errors
from kvstore.client.endpoints import Endpoints
from kvstore.client.types import KeyValue
from kvstore.v1 import watch_pb2, watch_pb2_grpc

log = logging.getLogger("kvstore.client.watch")

__all__ = ["WatchEvent", "WatchCompacted", "WatchCanceled", "watch_events"]

PUT = "PUT"
DELETE = "DELETE"
_TYPES = {watch_pb2.Event.PUT: PUT, watch_pb2.Event.DELETE: DELETE}
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change: type "PUT" or "DELETE"; `kv` after it (a delete: key and revision only)."""

    type: str
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @property
    def key(self) -> bytes:
        return self.kv.key

    @property
    def value(self) -> bytes:
        return self.kv.value


class WatchCanceled(errors.KvstoreError):
    """The member cancelled the watch (the message says why)."""


class WatchCompacted(WatchCanceled):
    """The revisions the watch still needed were compacted: history now starts at `compact_revision`."""

    code = grpc.StatusCode.OUT_OF_RANGE

    def __init__(self, message: str, compact_revision: int, endpoint: str | None = None) -> None:
        super().__init__(message, endpoint=endpoint)
        self.compact_revision = compact_revision


def _event(ev: watch_pb2.Event) -> WatchEvent:
    prev = KeyValue.from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None
    return WatchEvent(_TYPES[ev.type], KeyValue.from_pb(ev.kv), prev)


def create_request(key: bytes, range_end: bytes, start_revision: int, *, prev_kv: bool, no_put: bool,
                   no_delete: bool, progress_notify: bool) -> watch_pb2.WatchRequest:
    filters = []
    if no_put:
        filters.append(watch_pb2.WatchCreateRequest.NOPUT)
    if no_delete:
        filters.append(watch_pb2.WatchCreateRequest.NODELETE)
    return watch_pb2.WatchRequest(create_request=watch_pb2.WatchCreateRequest(
        key=key, range_end=range_end, start_revision=start_revision, prev_kv=prev_kv, filters=filters,
        progress_notify=progress_notify, fragment=True))


class WatchPosition:
    """Where a watch is: the next revision it wants (0 until the first member says where it starts)."""

    def __init__(self, start_revision: int) -> None:
        self.next_revision = start_revision
        self.endpoint: str | None = None


async def watch_events(
    endpoints: Endpoints, key: bytes, range_end: bytes, start_revision: int = 0, *, prev_kv: bool = False,
    no_put: bool = False, no_delete: bool = False, progress_notify: bool = False,
    position: WatchPosition | None = None, before_connect: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[WatchEvent]:
    """Every event of [key, range_end) from start_revision on (0: from now), resuming across members.

    ``before_connect`` runs before each (re)connection (the client authenticates there); each stream
    carries the credentials' token of that moment (see credentials.py)."""
    pos = position if position is not None else WatchPosition(start_revision)
    addr = endpoints.first()
    backoff = RECONNECT_MIN_S
    while True:
        pos.endpoint = addr
        if before_connect is not None:
            await before_connect()
        stub = watch_pb2_grpc.WatchStub(endpoints.conn(addr).channel)
        creds = endpoints.credentials
        call = stub.Watch(metadata=creds.metadata if creds is not None else None)
        try:
            await call.write(create_request(key, range_end, pos.next_revision, prev_kv=prev_kv, no_put=no_put,
                                            no_delete=no_delete, progress_notify=progress_notify))
            fragments: list[watch_pb2.Event] = []
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise _Broken("the member ended the stream")
                if resp.canceled:
                    if resp.compact_revision:
                        raise WatchCompacted(f"watch cancelled: {resp.cancel_reason}", resp.compact_revision,
                                             endpoint=addr)
                    raise WatchCanceled(f"watch cancelled: {resp.cancel_reason}", endpoint=addr)
                backoff = RECONNECT_MIN_S
                if resp.created:
                    if pos.next_revision == 0:
                        pos.next_revision = resp.header.revision + 1
                    continue
                if resp.fragment:
                    fragments.extend(resp.events)
                    continue
                events = [*fragments, *resp.events] if fragments else resp.events
                fragments = []
                for ev in events:
                    out = _event(ev)
                    pos.next_revision = out.revision + 1
                    yield out
                if not events:  # a progress notification: everything up to header.revision is seen
                    pos.next_revision = max(pos.next_revision, resp.header.revision + 1)
        except (grpc.aio.AioRpcError, _Broken) as e:
            why = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            log.info("watch on %s broke (%s); resuming at revision %d on another member", addr, why,
                     pos.next_revision)
        finally:
            call.cancel()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RECONNECT_MAX_S)
        addr = endpoints.after(addr)


class _Broken(Exception):
    pass
