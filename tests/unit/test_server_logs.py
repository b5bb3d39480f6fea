"""The node's log formats: one line per event, each with the member id and the current term."""
from __future__ import annotations

import json
import logging

import pytest

from kvstore.server import logs


@pytest.fixture
def term():
    current = {"term": 7}
    logs.log_term_from(lambda: current["term"])
    yield current
    logs.log_term_from(lambda: 0)


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise OSError(5, "Input/output error")
        except OSError:
            import sys

            exc_info = sys.exc_info()
    r = logging.LogRecord("kvstore.node", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_text_names_member_and_term_on_one_line(term):
    f = logs.TextFormatter("node2", 2)
    line = f.format(record("member %d is now %s", 2, "leader", exc=True))
    assert "\n" not in line
    assert " node2 WARNING kvstore.node member=2 term=7: member 2 is now leader | Traceback" in line
    assert line.endswith("OSError: [Errno 5] Input/output error")
    term["term"] = 8
    assert "term=8:" in f.format(record("x"))


def test_json_has_the_event_and_its_fields(term):
    f = logs.JsonFormatter(3)
    rec = record("peer member %d became inactive", 1, **logs.event("peer-lost", peer=1, error="refused"))
    doc = json.loads(f.format(rec))
    assert {k: doc[k] for k in ("level", "logger", "member", "term", "event", "msg", "peer", "error")} == {
        "level": "warning", "logger": "kvstore.node", "member": 3, "term": 7, "event": "peer-lost",
        "msg": "peer member 1 became inactive", "peer": 1, "error": "refused"}
    assert doc["ts"].endswith("Z")
    line = f.format(record("failed", exc=True))
    assert "\n" not in line and "OSError" in json.loads(line)["stack"]
