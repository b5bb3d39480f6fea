"""Partitions without root: every peer link goes through a TCP proxy we control.

Node ``a`` reaches node ``b``'s peer API through its own proxy for the
directed link a->b (a port on 127.0.0.1). While a partition cuts a-b:

- connections already open on the link are *reset* (RST, both sides), and
- new connections are accepted and reset at once (a refused call, quickly).

Bytes are never dropped mid-stream: a connection either carries everything
in order or dies visibly. That is weaker than the namespace network's
silent drops (no stalls, no timeouts to sit through), but it needs no
privileges and still splits the cluster for as long as the fault lasts.
Clients are never proxied: they reach every node, as in Jepsen.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterable, Mapping

Grudge = Mapping[int, Iterable[int]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the connection die, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class LinkProxy:
    """One directed link: listen on ``port``, forward to ``target``, cut when told."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int, target: tuple[str, int]) -> None:
        self.loop = loop
        self.port = port
        self.target = target
        self.blocked = False
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self.refused = 0
        self.reset = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)  # the target is down: the caller sees what it would see directly
            return
        pair = (writer, up_writer)
        if self.blocked:  # cut while we were connecting
            _reset(writer)
            _reset(up_writer)
            return
        self.connections.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self.connections.discard(pair)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            _reset(writer)

    def cut(self) -> None:
        """Block the link; reset every connection on it (called in the loop)."""
        self.blocked = True
        for down, up in list(self.connections):
            self.reset += 1
            _reset(down)
            if up is not None:
                _reset(up)
        self.connections.clear()

    def restore(self) -> None:
        self.blocked = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class ProxyNetwork:
    """Ports and proxies for a cluster on 127.0.0.1; the same API as the namespace network.

    Each node gets a client port, a real peer port, and (for every other node)
    the proxy port it must use to reach that node's peer API:
    :meth:`peer_addrs_for` is the ``--initial-cluster`` map to give node ``n``.
    """

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = sorted(nodes)
        self._client = {n: free_port() for n in self.nodes}
        self._peer = {n: free_port() for n in self.nodes}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvj-proxy", daemon=True)
        self.links: dict[tuple[int, int], LinkProxy] = {}
        self._grudge: dict[int, frozenset[int]] = {}

    def client_port(self, node: int) -> int:
        return self._client[node]

    def listen_peer_addr(self, node: int) -> str:
        return f"127.0.0.1:{self._peer[node]}"

    def peer_addrs_for(self, node: int) -> dict[int, str]:
        return {other: (self.listen_peer_addr(node) if other == node
                        else f"127.0.0.1:{self.links[(node, other)].port}") for other in self.nodes}

    def _call(self, coro_or_fn: object, timeout: float = 10.0) -> object:
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self._loop).result(timeout)
        done = asyncio.run_coroutine_threadsafe(self._run_fn(coro_or_fn), self._loop)
        return done.result(timeout)

    @staticmethod
    async def _run_fn(fn: object) -> object:
        return fn()  # type: ignore[operator]

    def start(self) -> ProxyNetwork:
        self._thread.start()
        for a in self.nodes:
            for b in self.nodes:
                if a != b:
                    link = LinkProxy(self._loop, free_port(), ("127.0.0.1", self._peer[b]))
                    self._call(link.start())
                    self.links[(a, b)] = link
        return self

    def partition(self, grudge: Grudge) -> None:
        """Cut link a-b (both directions) when either side holds a grudge against the other."""
        wanted = {a: frozenset(bs) for a, bs in grudge.items() if bs}

        def apply() -> None:
            for (a, b), link in self.links.items():
                if b in wanted.get(a, ()) or a in wanted.get(b, ()):
                    if not link.blocked:
                        link.cut()
                else:
                    link.restore()
        self._call(apply)
        self._grudge = wanted

    def heal(self) -> None:
        self.partition({})

    @property
    def grudge(self) -> dict[int, frozenset[int]]:
        return dict(self._grudge)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        for link in self.links.values():
            with contextlib.suppress(Exception):
                self._call(link.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ProxyNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
