"""Recorded client histories: events as the harness writes them, operations as the checker reads them.

The harness appends one JSON object per line (JSONL) for every event it sees::

    {"process": 3, "type": "invoke", "f": "cas", "key": "k1", "value": [1, 2], "time": 1718000000123456789}
    {"process": 3, "type": "ok",     "f": "cas", "key": "k1", "value": [1, 2], "time": 1718000000124000000}

- ``process``: the logical client that issued the call. A client has at most one
  call open at a time; a client that crashed mid-call comes back under a new number.
- ``type``: ``invoke`` when the call is issued, then exactly one of
  ``ok`` (it happened, ``value`` is the result), ``fail`` (a definite negative
  answer: for a write, it did not happen; for a cas, the compare did not match) or
  ``info`` (unknown: it may have happened at any point after the invoke, or never).
- ``f``: ``read`` / ``write`` / ``cas`` for a register; ``get`` / ``put`` /
  ``append`` / ``cas`` for the key-value map.
- ``key``: the key (omitted or null for a single register).
- ``value``: on invoke, the argument (``null`` for reads, ``[from, to]`` for cas);
  on completion, the result (what a read returned).
- ``time``: monotonic nanoseconds. Only the order matters.

Pairing events gives :class:`Operation` objects. An invoke with no completion
(the process crashed or the run ended) becomes an ``info`` operation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

INVOKE = "invoke"
OK = "ok"
FAIL = "fail"
INFO = "info"
EVENT_TYPES = frozenset({INVOKE, OK, FAIL, INFO})
COMPLETION_TYPES = frozenset({OK, FAIL, INFO})


class HistoryError(ValueError):
    """The history is malformed (e.g. a completion without an invoke)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a recorded history."""

    process: Any
    type: str
    f: str
    key: Any = None
    value: Any = None
    time: int | float = 0

    def to_json(self) -> str:
        """The JSONL line for this event (tuples become lists)."""
        record = {"process": self.process, "type": self.type, "f": self.f,
                  "key": self.key, "value": self.value, "time": self.time}
        return json.dumps(record, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Operation:
    """A call paired with its outcome: what the checker reasons about.

    ``complete_time`` is None when the call never completed; such an operation
    (like any ``info``) may take effect at any time after ``invoke_time``, or never.
    """

    index: int
    process: Any
    f: str
    key: Any
    value: Any
    output: Any
    outcome: str
    invoke_time: int | float
    complete_time: int | float | None

    @property
    def return_time(self) -> float:
        """When the effect must have happened by: +infinity when the outcome is unknown."""
        if self.outcome == INFO or self.complete_time is None:
            return math.inf
        return self.complete_time

    def __str__(self) -> str:
        key = "" if self.key is None else f" {self.key!r}"
        if self.outcome != OK or (self.output == self.value and self.value is not None):
            shown = _show(self.value)
        elif self.value is None:
            shown = f"-> {_show(self.output)}"
        else:
            shown = f"{_show(self.value)} -> {_show(self.output)}"
        return f"#{self.index} p{self.process} {self.f}{key} {shown} :{self.outcome}"


def _show(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, tuple):
        return "[" + " ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _hashable(value: Any) -> Any:
    """JSON arrays become tuples so values can live in hashable model states."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def event_from_record(record: dict[str, Any], line_number: int = 0) -> Event:
    """Validate one decoded JSONL record."""
    try:
        event_type = record["type"]
        process = record["process"]
        f = record["f"]
    except KeyError as missing:
        raise HistoryError(f"line {line_number}: event lacks {missing}") from None
    if event_type not in EVENT_TYPES:
        raise HistoryError(f"line {line_number}: unknown event type {event_type!r}")
    return Event(process=process, type=event_type, f=f,
                 key=_hashable(record.get("key")), value=_hashable(record.get("value")),
                 time=record.get("time", line_number))


def read_jsonl_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events from JSONL text; blank lines are skipped."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise HistoryError(f"line {line_number}: not JSON: {error}") from None
        if not isinstance(record, dict):
            raise HistoryError(f"line {line_number}: expected a JSON object")
        yield event_from_record(record, line_number)


def write_jsonl_events(events: Iterable[Event], out: TextIO) -> None:
    """Append events to a JSONL stream, one per line."""
    for event in events:
        out.write(event.to_json())
        out.write("\n")


def pair_events(events: Iterable[Event]) -> list[Operation]:
    """Match each invoke with its process's next completion.

    Operations are returned in invoke order. Invokes left open at the end, or
    superseded by a new invoke from the same process, become ``info``.
    """
    open_calls: dict[Any, tuple[int, Event]] = {}
    slots: list[Operation | None] = []  # one per invoke, filled when it closes

    def close(slot: int, invoke: Event, completion: Event | None) -> None:
        if completion is None:
            outcome, output, complete_time = INFO, None, None
        else:
            outcome, output, complete_time = completion.type, completion.value, completion.time
        slots[slot] = Operation(index=slot, process=invoke.process, f=invoke.f, key=invoke.key,
                                value=invoke.value, output=output, outcome=outcome,
                                invoke_time=invoke.time, complete_time=complete_time)

    for position, event in enumerate(events):
        if event.type == INVOKE:
            if event.process in open_calls:
                close(*open_calls.pop(event.process), None)
            open_calls[event.process] = (len(slots), event)
            slots.append(None)
            continue
        if event.process not in open_calls:
            raise HistoryError(f"event {position}: {event.type} from process {event.process!r} "
                               "which has no open invoke")
        slot, invoke = open_calls.pop(event.process)
        if invoke.f != event.f:
            raise HistoryError(f"event {position}: {event.f} completes a {invoke.f} invoke "
                               f"from process {event.process!r}")
        close(slot, invoke, event)
    for slot, invoke in open_calls.values():
        close(slot, invoke, None)
    return [op for op in slots if op is not None]  # every slot was closed above


def load_jsonl(path: str | Path) -> list[Operation]:
    """Operations from a JSONL history file."""
    with open(path, encoding="utf-8") as lines:
        return pair_events(read_jsonl_events(lines))
