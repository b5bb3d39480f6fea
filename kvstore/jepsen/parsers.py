"""Readers for the history formats the checker accepts, and for verdict lists.

- JSONL: the project's own format (see :mod:`kvstore.jepsen.history`).
- etcd-jepsen logs: ``INFO  jepsen.util - <process> :<type> :<f> <value>``, fields
  split on tabs or runs of spaces; values ``nil``, integers, ``[from to]``, keywords.
- EDN lines: one flat map per line, e.g.
  ``{:process 0, :type :invoke, :f :append, :key "0", :value "x 0 0 y"}``.

The two foreign formats carry no clock, so an event's time is its line number:
only the order matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kvstore.jepsen.history import (
    EVENT_TYPES,
    Event,
    HistoryError,
    Operation,
    pair_events,
    read_jsonl_events,
)

JSONL = "jsonl"
ETCD_LOG = "etcd-log"
EDN = "edn"

_ETCD_MARKER = "jepsen.util -"


@dataclass(frozen=True, slots=True)
class Keyword:
    """An EDN keyword such as ``:timed-out``; never equal to a string that looks alike."""

    name: str

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return ":" + self.name


# ---------------------------------------------------------------- EDN values

_EDN_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<open>[\[{(])
    | (?P<close>[\]})])
    | (?P<atom>[^\s,\[\]{}()"]+)
    )[\s,]*""", re.VERBOSE)

_STRING_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _edn_atom(text: str) -> Any:
    if text == "nil":
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if text.startswith(":"):
        return Keyword(text[1:])
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return Keyword(text)  # a bare symbol; keep its name


def _edn_string(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: _STRING_ESCAPES.get(m.group(1), m.group(1)), literal[1:-1])


def parse_edn_value(text: str) -> Any:
    """One EDN value: nil, booleans, numbers, strings, keywords, vectors (as tuples), maps."""
    tokens = list(_edn_tokens(text))
    value, position = _edn_read(tokens, 0, text)
    if position != len(tokens):
        raise HistoryError(f"trailing text after EDN value: {text!r}")
    return value


def _edn_tokens(text: str) -> Iterator[tuple[str, str]]:
    position = 0
    text = text.strip()
    while position < len(text):
        match = _EDN_TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise HistoryError(f"cannot read EDN at column {position}: {text!r}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        yield kind, match.group(kind)


def _edn_read(tokens: list[tuple[str, str]], position: int, text: str) -> tuple[Any, int]:
    if position >= len(tokens):
        raise HistoryError(f"EDN value ends early: {text!r}")
    kind, token = tokens[position]
    if kind == "string":
        return _edn_string(token), position + 1
    if kind == "atom":
        return _edn_atom(token), position + 1
    if kind == "close":
        raise HistoryError(f"unexpected {token!r} in EDN: {text!r}")
    closer = {"[": "]", "(": ")", "{": "}"}[token]
    items: list[Any] = []
    position += 1
    while True:
        if position >= len(tokens):
            raise HistoryError(f"unclosed {token!r} in EDN: {text!r}")
        if tokens[position] == ("close", closer):
            position += 1
            break
        item, position = _edn_read(tokens, position, text)
        items.append(item)
    if token != "{":
        return tuple(items), position
    if len(items) % 2:
        raise HistoryError(f"EDN map with an odd number of forms: {text!r}")
    return dict(zip(items[0::2], items[1::2])), position


def read_edn_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events from EDN lines, one ``{:process .. :type .. :f .. :key .. :value ..}`` per line."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_edn_value(line)
        if not isinstance(record, dict):
            raise HistoryError(f"line {line_number}: expected an EDN map")
        fields = {str(k): v for k, v in record.items()}
        event_type = str(fields.get("type"))
        if event_type not in EVENT_TYPES or "process" not in fields or "f" not in fields:
            raise HistoryError(f"line {line_number}: not a history event: {line.strip()}")
        yield Event(process=fields["process"], type=event_type, f=str(fields["f"]),
                    key=fields.get("key"), value=fields.get("value"), time=line_number)


# ----------------------------------------------------------- etcd-jepsen logs

def read_etcd_log_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events from an etcd-jepsen log; lines without the ``jepsen.util -`` marker are skipped."""
    for line_number, line in enumerate(lines, start=1):
        marker = line.find(_ETCD_MARKER)
        if marker < 0:
            continue
        fields = line[marker + len(_ETCD_MARKER):].split(None, 3)
        if len(fields) < 3:
            raise HistoryError(f"line {line_number}: too few fields: {line.strip()}")
        process_text, type_text, f_text = fields[:3]
        value_text = fields[3].strip() if len(fields) == 4 else "nil"
        event_type = type_text.lstrip(":")
        if event_type not in EVENT_TYPES:
            raise HistoryError(f"line {line_number}: unknown event type {type_text!r}")
        try:
            process: Any = int(process_text)
        except ValueError:
            process = process_text
        yield Event(process=process, type=event_type, f=f_text.lstrip(":"),
                    value=parse_edn_value(value_text), time=line_number)


# ------------------------------------------------------------ whole files

def detect_format(path: str | Path) -> str:
    """JSONL, etcd log or EDN, judged from the first non-blank line (JSONL if empty)."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if _ETCD_MARKER in text:
                return ETCD_LOG
            if text.startswith("{:") or text.startswith("{ :"):
                return EDN
            if text.startswith("{"):
                return JSONL
            raise HistoryError(f"{path}: unrecognised history format: {text[:80]!r}")
    return JSONL


_READERS = {JSONL: read_jsonl_events, ETCD_LOG: read_etcd_log_events, EDN: read_edn_events}


def load_events(path: str | Path, fmt: str | None = None) -> list[Event]:
    """All events of a history file, in file order."""
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown history format {fmt!r}; expected one of {sorted(_READERS)}")
    with open(path, encoding="utf-8") as lines:
        return list(_READERS[fmt](lines))


def load_operations(path: str | Path, fmt: str | None = None) -> list[Operation]:
    """Operations (invokes paired with completions) of a history file."""
    return pair_events(load_events(path, fmt))


def read_verdicts(path: str | Path) -> dict[str, bool]:
    """A VERDICTS file: ``<file name> linearizable|not-linearizable`` per line -> {name: ok}."""
    verdicts: dict[str, bool] = {}
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or fields[1] not in ("linearizable", "not-linearizable"):
                raise ValueError(f"{path}:{line_number}: expected '<file> linearizable|"
                                 f"not-linearizable', got {line.strip()!r}")
            verdicts[fields[0]] = fields[1] == "linearizable"
    return verdicts
