"""Sequential specifications the checker holds a history against.

A model says, for one operation applied to one state, whether that outcome was
possible and what the state becomes. States are immutable and hashable, and
``==`` on them is the model's equality: the checker memoizes on
``(linearized set, state)``, so two states that compare equal must behave the same.

Operations reach ``step`` with outcome ``ok``, ``fail`` (only for functions in
``definite_fail_functions``) or ``info``. The checker has already dropped what
cannot matter: failed or unknown reads, and failed writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any, cast

from kvstore.jepsen.history import FAIL, OK, Operation

State = Hashable


class Model(ABC):
    """A sequential object: initial state, transition, equality."""

    name: str = "model"
    #: functions with no effect; when their outcome is unknown they can be dropped.
    read_functions: frozenset[str] = frozenset()
    #: functions whose ``fail`` is a real answer (a cas whose compare did not match),
    #: kept and checked; every other ``fail`` means "certainly did not happen".
    definite_fail_functions: frozenset[str] = frozenset()
    #: True when a state describes a single key, so a history naming several keys
    #: must be split by key before it is checked.
    per_key: bool = False

    @abstractmethod
    def init(self) -> State:
        """The state before any operation."""

    @abstractmethod
    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        """(was this outcome possible from ``state``, the state after it)."""

    def equal(self, a: State, b: State) -> bool:
        """Model equality; states are plain values, so this is ``==``."""
        return a == b

    def partition_key(self, op: Operation) -> Hashable:
        """Operations with different keys never interact (P-compositionality)."""
        return op.key

    def for_partition(self, key: Hashable) -> Model:
        """The model for one partition's sub-history: may be smaller (cheaper states)."""
        return self

    def describe(self, state: State) -> str:
        """The state, for a human reading a verdict."""
        return "nil" if state is None else repr(state)


def _cas(current: Any, op: Operation) -> tuple[bool, Any]:
    """Compare-and-set on one value; ``op.value`` is ``(expected, new)``."""
    expected, new = op.value
    matches = current == expected
    if op.outcome == OK:
        return matches, new if matches else current
    if op.outcome == FAIL:  # the compare did not match: a real answer, no effect
        return not matches, current
    return True, new if matches else current  # unknown: it applied iff it matched


class RegisterModel(Model):
    """A single compare-and-set register: read / write / cas, initially nil."""

    name = "cas-register"
    read_functions = frozenset({"read"})
    definite_fail_functions = frozenset({"cas"})
    per_key = True

    def __init__(self, initial: Any = None) -> None:
        self.initial = initial

    def init(self) -> State:
        return self.initial

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        f = op.f
        if f == "read":
            return op.outcome != OK or op.output == state, state
        if f == "write":
            return True, op.value
        if f == "cas":
            return _cas(state, op)
        raise ValueError(f"{self.name} has no function {f!r} ({op})")


class KeyValueModel(Model):
    """One key of a key-value map: get / put / append / cas on a single value.

    ``missing`` is what a get returns before any put (the reference histories use
    the empty string); appending to a missing value starts from the empty string.
    """

    name = "kv-key"
    read_functions = frozenset({"get"})
    definite_fail_functions = frozenset({"cas"})
    per_key = True

    def __init__(self, missing: Any = None) -> None:
        self.missing = missing

    def init(self) -> State:
        return self.missing

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        f = op.f
        if f == "get":
            return op.outcome != OK or op.output == state, state
        if f == "put":
            return True, op.value
        if f == "append":
            return True, ("" if state is None else state) + op.value
        if f == "cas":
            return _cas(state, op)
        raise ValueError(f"{self.name} has no function {f!r} ({op})")


class KvModel(Model):
    """A key-value map: each key a :class:`KeyValueModel`.

    The state is a frozenset of (key, value) pairs, keys still at ``missing`` left
    out. Checked per key (the usual way), each partition uses the single-key
    model, whose state is just the value.
    """

    name = "kv-map"
    read_functions = KeyValueModel.read_functions
    definite_fail_functions = KeyValueModel.definite_fail_functions
    per_key = False

    def __init__(self, missing: Any = None) -> None:
        self.missing = missing
        self.key_model = KeyValueModel(missing)

    def for_partition(self, key: Hashable) -> Model:
        return self.key_model

    def init(self) -> State:
        return frozenset()

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        key = op.key
        current = self.missing
        pairs = cast("frozenset[tuple[Any, Any]]", state)
        for stored_key, value in pairs:
            if stored_key == key:
                current = value
                break
        legal, new = self.key_model.step(current, op)
        if not legal or new == current:
            return legal, state
        kept = frozenset(pair for pair in pairs if pair[0] != key)
        return True, kept if new == self.missing else kept | {(key, new)}

    def describe(self, state: State) -> str:
        if not state:
            return "{}"
        pairs = sorted(cast("frozenset[tuple[Any, Any]]", state), key=repr)
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in pairs) + "}"
