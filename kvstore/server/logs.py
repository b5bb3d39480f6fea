"""A node's log: one line per event, each naming the member and its current raft term.

`--log-format text` (the default) is for people:

    2026-12-06 14:20:00,123 node1 INFO kvstore.node member=1 term=3: member 1 is now leader; leader is 1

`--log-format json` is for log pipelines, one object per line with etcd-like
fields (ts, level, logger, msg, member, term) plus the event's own fields:

    {"ts":"2026-12-06T14:20:00.123Z","level":"info","logger":"kvstore.node","member":1,"term":3,
     "event":"leader-changed","msg":"member 1 is now leader; leader is 1","leader":1,"role":"leader"}

Events carry a name and fields through `logging`'s extra: event(...) builds it,
e.g. log.info("...", extra=event("peer-lost", peer=2)). A traceback stays on
its event's line (escaped in json, joined with " | " in text).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["setup_logging", "log_term_from", "event"]

_EVENT = "kvstore_event"  # the LogRecord attribute holding (name, fields)
_term: Callable[[], int] = lambda: 0  # noqa: E731 - replaced by log_term_from once the node exists


def event(name: str, **fields: Any) -> dict[str, Any]:
    """`extra=` for a log call that is one of the node's named events."""
    return {_EVENT: (name, fields)}


def log_term_from(source: Callable[[], int]) -> None:
    """Every later line carries source() as its term (the node's current term)."""
    global _term
    _term = source


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    return formatter.formatException(record.exc_info) if record.exc_info else ""


class TextFormatter(logging.Formatter):
    def __init__(self, name: str, member_id: int) -> None:
        super().__init__(f"%(asctime)s {name} %(levelname)s %(name)s member={member_id} term=%(term)d: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.term = _term()
        exc, record.exc_info, record.exc_text = record.exc_info, None, None
        line = super().format(record)
        record.exc_info = exc
        tb = _traceback(self, record)
        return f"{line} | {' | '.join(tb.splitlines())}" if tb else line


class JsonFormatter(logging.Formatter):
    def __init__(self, member_id: int) -> None:
        super().__init__()
        self.member_id = member_id

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                               "member": self.member_id, "term": _term()}
        name, fields = getattr(record, _EVENT, (None, {}))
        if name is not None:
            doc["event"] = name
        doc["msg"] = record.getMessage()
        for k, v in fields.items():
            doc.setdefault(k, v)
        tb = _traceback(self, record)
        if tb:
            doc["stack"] = tb
        return json.dumps(doc, default=str)


def setup_logging(log_format: str, level: str, name: str, member_id: int) -> None:
    """Route every logger of the process to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(member_id) if log_format == "json" else TextFormatter(name, member_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
