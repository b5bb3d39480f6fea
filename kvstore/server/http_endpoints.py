"""HTTP on --listen-metrics-addr: /metrics, /health, /livez, /readyz (etcd's endpoints).

Served by a few lines of asyncio on the node's own event loop rather than
prometheus_client's threaded server: a thread would fight the loop for the GIL
on the hot path, while a scrape here is one short turn of the loop every few
seconds. Only GET (and HEAD) of these paths, one request per connection.

    /metrics  Prometheus text format (metrics_export.py)
    /health   {"health":"true","reason":""} 200, or 503 with the reason (health.py)
    /livez    "ok" 200 while the process answers
    /readyz   "ok" 200, or 503 with "[-]" and each reason, one per line
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import health
from .metrics_export import build_registry

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("kvstore.http")

REQUEST_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8 << 10

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpEndpoints:
    PATHS = ("/metrics", "/health", "/livez", "/readyz")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = build_registry(node)
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen; OSError if the address cannot be bound."""
        self.server = await asyncio.start_server(self._serve, host or None, port, reuse_address=True,
                                                 limit=MAX_HEAD_BYTES)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def route(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/health":
            reasons = health.problems(self.node)
            body = {"health": "false" if reasons else "true", "reason": "; ".join(reasons)}
            return (503 if reasons else 200), "application/json", json.dumps(body).encode()
        if path == "/livez":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            reasons = health.problems(self.node)
            if reasons:
                return 503, "text/plain; charset=utf-8", "".join(f"[-]{r}\n" for r in reasons).encode()
            return 200, "text/plain; charset=utf-8", b"ok\n"
        return 404, "text/plain; charset=utf-8", f"not found; try {', '.join(self.PATHS)}\n".encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            method, path, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain; charset=utf-8", b"only GET\n"
            else:
                status, ctype, body = self.route(path)
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except ValueError:  # not an HTTP request line
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except Exception as e:  # a scrape must never take the node down
            log.warning("HTTP request failed: %r", e)
        finally:
            writer.close()
