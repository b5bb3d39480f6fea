"""The Watch stream: create and cancel watches, and send their events (see watch_hub.py).

One stream carries any number of watches. The handler reads requests; one
writer task per stream sends (grpc.aio allows one write in flight): control
answers (created, cancelled, progress) first, then each watcher's buffered
events, round robin, whole revisions per response up to MAX_RESPONSE_BYTES.
A single revision larger than that is split, every piece but the last
marked `fragment`. A watcher whose buffer is empty but who is not synced
reads its next page of history here, so catching up costs its own stream
the time, never the apply path nor the other watchers.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque

import grpc

from kvstore.storage import history
from kvstore.storage.keys import HEADER_SIZE, MAX_KEY_BYTES, RECORD_HEADER
from kvstore.storage.permissions import READ
from kvstore.storage.state_machine import StateMachineClosed
from kvstore.v1 import kv_pb2, watch_pb2, watch_pb2_grpc

from .auth_guard import AuthGuard
from .corruption import check_not_corrupt
from .errors import RequestFailed
from .node import Node
from .watch_hub import RevisionError, Watcher, WatchHub

log = logging.getLogger("kvstore.watch")

MAX_RESPONSE_BYTES = 1 << 20  # events per response, about (the client accepts 64 MiB messages)
_NOPUT = watch_pb2.WatchCreateRequest.NOPUT
_NODELETE = watch_pb2.WatchCreateRequest.NODELETE


class WatchService(watch_pb2_grpc.WatchServicer):
    def __init__(self, node: Node, progress_interval_s: float, guard: AuthGuard | None = None) -> None:
        self.node = node
        self.progress_interval_s = progress_interval_s
        self.event_fields = EventFields()
        self.guard = guard if guard is not None else AuthGuard(node)

    async def Watch(self, request_iterator, context) -> None:
        try:
            self.node.check_serving()
            check_not_corrupt(self.node)  # its events would be wrong, as its reads would
            user = self.guard.user(context)  # with auth enabled: who watches (each watch needs read permission)
        except RequestFailed as e:
            await e.abort(context)
        stream = _WatchStream(self.node, self.node.watch_hub, context, self.progress_interval_s, self.event_fields)
        stream.user, stream.guard = user, self.guard
        await stream.run(request_iterator)


_EVENTS_FIELD = 11  # WatchResponse.events


class EventFields:
    """Encoded WatchResponse.events fields of recent events, shared by every stream of the member."""

    MAX = 8192  # entries kept; cleared when full (the watchers of a burst read it together)

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, bool], bytes] = {}

    def field(self, ev: history.Event, prev: history.Event | None) -> bytes:
        key = (ev.revision, ev.sub, prev is not None)
        out = self._cache.get(key)
        if out is None:
            if len(self._cache) >= self.MAX:
                self._cache.clear()
            data = to_event(ev, prev).SerializeToString()
            out = self._cache[key] = _tag_length(_EVENTS_FIELD, len(data)) + data
        return out


def _tag_length(field: int, n: int) -> bytes:
    """A length-delimited field's tag and length (protobuf varints)."""
    out = bytearray([(field << 3) | 2])
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def as_bytes(msg: watch_pb2.WatchResponse | bytes) -> bytes:
    """The Watch method's response serializer: responses built as wire bytes pass as they are."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def add_watch_service(service: WatchService, server: grpc.aio.Server) -> None:
    """Register the Watch service with a serializer that also takes ready-made bytes (see _responses)."""
    handler = grpc.stream_stream_rpc_method_handler(
        service.Watch, request_deserializer=watch_pb2.WatchRequest.FromString, response_serializer=as_bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvstore.v1.Watch", {"Watch": handler}),))


def to_event(ev: history.Event, prev: history.Event | None) -> watch_pb2.Event:
    """The watch Event of a history event; prev is the key's previous put (prev_kv), if wanted."""
    out = watch_pb2.Event(type=watch_pb2.Event.PUT if ev.kind == history.PUT else watch_pb2.Event.DELETE)
    if ev.kind == history.PUT:
        _put_key_value(out.kv, ev)
    else:
        out.kv.key, out.kv.mod_revision = ev.key, ev.revision
    if prev is not None:
        _put_key_value(out.prev_kv, prev)
    return out


def _put_key_value(kv: kv_pb2.KeyValue, ev: history.Event) -> None:
    create, mod, _, version = RECORD_HEADER.unpack_from(ev.record)
    kv.key, kv.create_revision, kv.mod_revision, kv.version = ev.key, create, mod, version
    kv.value, kv.lease = ev.record[HEADER_SIZE:], ev.lease


class _WatchStream:
    def __init__(self, node: Node, hub: WatchHub, context, progress_interval_s: float,
                 event_fields: EventFields) -> None:
        self.node, self.hub, self.context = node, hub, context
        self.user: str | None = None  # with auth enabled, each watch is checked for read permission
        self.guard: AuthGuard | None = None
        self.hub_cache = event_fields
        self.progress_interval_s = progress_interval_s
        self.watchers: dict[int, Watcher] = {}
        self.control: deque[watch_pb2.WatchResponse] = deque()
        self.wakeup = asyncio.Event()
        self._ids = itertools.count(1)
        self._last_sent: dict[int, float] = {}
        self._progress_asked = False

    def _header(self, revision: int) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(cluster_id=self.node.cfg.cluster_id, member_id=self.node.id,
                                     raft_term=self.node.term, revision=revision)

    async def run(self, requests) -> None:
        writer = asyncio.ensure_future(self._write_loop())
        try:
            async for req in requests:
                kind = req.WhichOneof("request_union")
                if kind == "create_request":
                    self._create(req.create_request)
                elif kind == "cancel_request":
                    self._cancel(req.cancel_request.watch_id, "")
                elif kind == "progress_request":
                    self._progress_asked = True
                self.wakeup.set()
            # The client closed its side: finish sending what is queued, then end.
            self.control.append(None)  # type: ignore[arg-type]
            self.wakeup.set()
            await writer
        finally:
            writer.cancel()
            for w in self.watchers.values():
                self.hub.remove(w)
            self.watchers.clear()

    def _create(self, c: watch_pb2.WatchCreateRequest) -> None:
        wid = c.watch_id or next(self._ids)
        problem = ""
        if not c.key or len(c.key) > MAX_KEY_BYTES:
            problem = f"watch key must be 1 to {MAX_KEY_BYTES} bytes"
        elif c.start_revision < 0:
            problem = "start_revision must be >= 0"
        elif wid in self.watchers:
            problem = f"watch id {wid} is already in use on this stream"
        elif self.user is not None and self.guard is not None:
            perms = self.guard.node.sm.auth.permissions(self.user)
            if perms is None:
                problem = f"user {self.user!r} does not exist"
            elif not perms.allows(READ, c.key, c.range_end):
                problem = f"permission denied: user {self.user!r} may not read what the watch covers"
        if problem:
            self.control.append(watch_pb2.WatchResponse(header=self._header(self.hub.revision), watch_id=wid,
                                                        created=True, canceled=True, cancel_reason=problem))
            return
        w = Watcher(wid, c.key, c.range_end, c.start_revision, prev_kv=c.prev_kv,
                    no_put=_NOPUT in c.filters, no_delete=_NODELETE in c.filters,
                    progress_notify=c.progress_notify, wake=self.wakeup.set)
        self.control.append(watch_pb2.WatchResponse(header=self._header(self.hub.revision), watch_id=wid,
                                                    created=True))
        self.watchers[wid] = w
        self._last_sent[wid] = time.monotonic()
        self.hub.add(w)

    def _cancel(self, wid: int, reason: str, compact_revision: int = 0) -> None:
        w = self.watchers.pop(wid, None)
        if w is not None:
            self.hub.remove(w)
        self._last_sent.pop(wid, None)
        self.control.append(watch_pb2.WatchResponse(
            header=self._header(self.hub.revision), watch_id=wid, canceled=True, cancel_reason=reason,
            compact_revision=compact_revision))

    async def _write_loop(self) -> None:
        write = self.context.write
        while True:
            while self.control:
                msg = self.control.popleft()
                if msg is None:  # the client closed its side: end once all that is due is sent
                    if not self._progress_asked and not any(w.pending for w in self.watchers.values()):
                        return
                    self.control.append(msg)
                    break
                await write(msg)
            sent = False
            for w in list(self.watchers.values()):
                if w.id not in self.watchers:
                    continue
                if not w.pending and not w.synced:
                    if not self.hub.ready:
                        await self.hub.wait_ready()
                    try:
                        self.hub.catch_up(w)
                    except RevisionError:
                        sm = self.hub.sm
                        self._cancel(w.id, f"mvcc: {history.COMPACTED}", sm.compact_revision if sm else 0)
                        continue
                    except StateMachineClosed:
                        return
                    sent = True  # more work may follow; look again before sleeping
                    await asyncio.sleep(0)
                if w.pending:
                    for msg in self._responses(w):
                        await write(msg)
                    self._last_sent[w.id] = time.monotonic()
                    sent = True
            if self._progress_asked and all(w.synced and not w.pending for w in self.watchers.values()):
                self._progress_asked = False
                await write(watch_pb2.WatchResponse(header=self._header(self.hub.revision), watch_id=-1))
            self._progress_notify()
            if sent or self.control:
                continue
            self.wakeup.clear()
            try:
                timeout = self.progress_interval_s if self.progress_interval_s > 0 else None
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _progress_notify(self) -> None:
        """An idle, synced watcher that asked for progress notifications gets the hub's revision."""
        if self.progress_interval_s <= 0:
            return
        now = time.monotonic()
        for w in self.watchers.values():
            if w.progress_notify and w.synced and not w.pending \
                    and now - self._last_sent.get(w.id, now) >= self.progress_interval_s:
                self._last_sent[w.id] = now
                self.control.append(watch_pb2.WatchResponse(header=self._header(self.hub.revision),
                                                            watch_id=w.id))

    def _responses(self, w: Watcher):
        """Responses carrying the watcher's buffered events, as wire bytes: whole revisions up to
        MAX_RESPONSE_BYTES each; one revision larger than that is split into fragments.

        A message's fields may come in any order and repeat, so a response is its header
        fields followed by each event's encoded field, which the watchers of one prefix share
        (event_field): an event is encoded once, however many watch it."""
        while w.pending:
            fields = []
            size = 0
            rev = 0
            fragment = False
            while w.pending:
                ev, prev = w.pending[0]
                n = len(ev.key) + len(ev.record) + (len(prev) if prev else 0) + 32
                if size and size + n > MAX_RESPONSE_BYTES and ev.revision != rev:
                    break  # a revision boundary: this response is full
                if size and size + n > MAX_RESPONSE_BYTES:  # one revision too large: a fragment ends here
                    fragment = True
                    break
                w.pending.popleft()
                fields.append(self.hub_cache.field(ev, prev))
                size += n
                rev = ev.revision
            # Everything up to `rev` is sent; a synced watcher has everything up to the hub's revision
            # once its buffer is empty.
            done = self.hub.revision if w.synced and not w.pending else rev
            head = watch_pb2.WatchResponse(watch_id=w.id, fragment=fragment,
                                           header=self._header(done if not fragment else rev - 1))
            yield head.SerializeToString() + b"".join(fields)
