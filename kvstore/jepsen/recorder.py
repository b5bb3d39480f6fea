"""Recording what clients and the nemesis did, as it happens.

Client operations go to ``history.jsonl`` in the checker's schema
(:mod:`kvstore.jepsen.history`): one ``invoke`` line when a call is issued and
one ``ok``/``fail``/``info`` line when it completes. Lines are flushed as they
are written, so a run that dies still leaves a history that can be checked.

Nemesis actions are kept apart, in ``faults.jsonl``: the checker reasons about
client calls only, and the report needs fault *windows* (start, end, what).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kvstore.jepsen.history import COMPLETION_TYPES, INVOKE, Event


@dataclass
class Fault:
    """One fault window: what the nemesis did, to whom, from when to when (ns, run clock)."""

    kind: str          # "partition", "kill", "pause"
    description: str   # e.g. "isolate leader n2: {n2} | {n1,n3}"
    nodes: list[int]
    start: int
    end: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Thread-safe sink for events and faults; keeps them in memory and on disk.

    ``clock`` gives monotonic nanoseconds; only order and differences matter.
    """

    def __init__(self, history_path: str | Path | None = None,
                 faults_path: str | Path | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.start_time = clock()
        self.events: list[Event] = []
        self.faults: list[Fault] = []
        self._open: dict[Any, Event] = {}
        self._lock = threading.Lock()
        self._history: TextIO | None = open(history_path, "w", encoding="utf-8") if history_path else None
        self._faults: TextIO | None = open(faults_path, "w", encoding="utf-8") if faults_path else None

    # ------------------------------------------------------------ operations
    def invoke(self, process: Any, f: str, key: Any = None, value: Any = None) -> Event:
        """Record that ``process`` issues ``f``; a process has at most one open call."""
        with self._lock:
            if process in self._open:
                raise RuntimeError(f"process {process!r} already has an open call "
                                   f"({self._open[process].f})")
            event = Event(process=process, type=INVOKE, f=f, key=key, value=value, time=self.clock())
            self._open[process] = event
            self._append(event)
            return event

    def complete(self, process: Any, outcome: str, value: Any = None) -> Event:
        """Record the outcome of ``process``'s open call: ok, fail or info."""
        if outcome not in COMPLETION_TYPES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            invoke = self._open.pop(process, None)
            if invoke is None:
                raise RuntimeError(f"process {process!r} has no open call to complete")
            event = Event(process=process, type=outcome, f=invoke.f, key=invoke.key,
                          value=value, time=self.clock())
            self._append(event)
            return event

    def open_calls(self) -> dict[Any, Event]:
        with self._lock:
            return dict(self._open)

    def _append(self, event: Event) -> None:
        self.events.append(event)
        if self._history is not None:
            self._history.write(event.to_json() + "\n")
            self._history.flush()

    # ---------------------------------------------------------------- faults
    def fault_started(self, kind: str, description: str, nodes: list[int],
                      **detail: Any) -> Fault:
        fault = Fault(kind=kind, description=description, nodes=sorted(nodes),
                      start=self.clock(), detail=detail)
        with self._lock:
            self.faults.append(fault)
        self._write_fault("start", fault)
        return fault

    def fault_ended(self, fault: Fault) -> None:
        fault.end = self.clock()
        self._write_fault("end", fault)

    def _write_fault(self, phase: str, fault: Fault) -> None:
        if self._faults is None:
            return
        with self._lock:
            self._faults.write(json.dumps({"phase": phase, **asdict(fault)}, default=str) + "\n")
            self._faults.flush()

    # --------------------------------------------------------------- summary
    def outcome_counts(self) -> dict[str, int]:
        """Completed calls by outcome, plus calls never completed (counted as info)."""
        with self._lock:
            counts = Counter(e.type for e in self.events if e.type != INVOKE)
            counts["info"] += len(self._open)
        return {k: counts.get(k, 0) for k in ("ok", "fail", "info")}

    def close(self) -> None:
        for stream in (self._history, self._faults):
            if stream is not None:
                stream.close()
        self._history = self._faults = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_faults(path: str | Path) -> list[Fault]:
    """Fault windows from ``faults.jsonl`` (a window with no end line never ended)."""
    faults: dict[tuple[str, int], Fault] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            phase = record.pop("phase")
            fault = Fault(**record)
            key = (fault.description, fault.start)
            if phase == "start" or key not in faults:
                faults[key] = fault
            else:
                faults[key].end = fault.end
    return sorted(faults.values(), key=lambda f: f.start)
