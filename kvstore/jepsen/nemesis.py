"""Faults, and the schedule that injects them: fault for a while, heal, repeat.

A nemesis spec is a comma-separated list of *windows*; each window is one
package or several joined with ``+`` (applied together). Windows take turns:
``partition,kill`` alternates a partition window with a kill window;
``partition+pause`` partitions and pauses a node at the same time.

Packages (names for ``--nemesis``):

- ``partition``: rotates through the four shapes below.
  ``partition-halves``: a random minority | majority split.
  ``partition-leader``: the current leader alone | the rest.
  ``partition-ring``: every node sees a majority, no two see the same one
  (each node connected to its ring neighbours; needs 5+ nodes, with fewer it is
  the bridge, the closest shape that exists).
  ``partition-bridge``: two halves and one node that sees both.
- ``kill``: alternates ``kill-random`` and ``kill-leader``: SIGKILL, and the node
  is restarted when the window ends (its disk survives, as after a crash).
- ``pause``: alternates ``pause-random`` and ``pause-leader``: SIGSTOP, SIGCONT at heal.
- ``power``, ``power-all``: power cuts (unsynced writes lost), see :mod:`kvstore.jepsen.power`.
- ``clock``: one node's wall clock an hour ahead or behind (see :mod:`kvstore.jepsen.clock`).
- ``member``: remove a random member, wipe its data, add it back as a learner; promoted at heal
  (see :mod:`kvstore.jepsen.member`).

Grudges are always symmetric: with TCP a one-sided drop cuts both directions
anyway, and a symmetric one says what the partition really is.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.jepsen.recorder import Fault, Recorder


class ClusterControl(Protocol):
    """What the nemesis may do to a cluster; the runner implements it."""

    nodes: list[int]

    def leader(self) -> int | None: ...
    def kill(self, node: int) -> None: ...
    def restart(self, node: int) -> None: ...
    def pause(self, node: int) -> None: ...
    def resume(self, node: int) -> None: ...
    def partition(self, grudge: dict[int, set[int]]) -> None: ...
    def heal_network(self) -> None: ...


# ------------------------------------------------------------------ grudges

def grudge_of(components: Sequence[Sequence[int]]) -> dict[int, set[int]]:
    """Each node drops every node outside its own component."""
    everyone = {n for c in components for n in c}
    return {n: everyone - set(c) for c in components for n in c}


def halves(nodes: Sequence[int], rng: random.Random) -> list[list[int]]:
    shuffled = rng.sample(list(nodes), len(nodes))
    cut = len(shuffled) // 2
    return [sorted(shuffled[:cut]), sorted(shuffled[cut:])]


def isolate(node: int, nodes: Sequence[int]) -> list[list[int]]:
    return [[node], sorted(n for n in nodes if n != node)]


def bridge(nodes: Sequence[int], rng: random.Random) -> tuple[dict[int, set[int]], int]:
    """Two sides that cannot talk, and a bridge node that talks to both."""
    shuffled = rng.sample(list(nodes), len(nodes))
    middle = shuffled[len(shuffled) // 2]
    left, right = shuffled[:len(shuffled) // 2], shuffled[len(shuffled) // 2 + 1:]
    grudge = {n: set(right) for n in left} | {n: set(left) for n in right}
    grudge[middle] = set()
    return grudge, middle


def majority_ring(nodes: Sequence[int], rng: random.Random) -> dict[int, set[int]]:
    """Nodes on a shuffled ring, each connected to its k nearest neighbours per side,
    k the smallest that makes self + 2k a majority."""
    ring = rng.sample(list(nodes), len(nodes))
    n = len(ring)
    majority = n // 2 + 1
    k = majority // 2  # ceil((majority - 1) / 2)
    grudge = {}
    for i, node in enumerate(ring):
        seen = {ring[(i + d) % n] for d in range(-k, k + 1)}
        grudge[node] = set(ring) - seen
    return grudge


def describe_grudge(grudge: dict[int, set[int]]) -> str:
    cut = sorted({tuple(sorted((a, b))) for a, bs in grudge.items() for b in bs})
    return ", ".join(f"n{a} -x- n{b}" for a, b in cut) or "no cuts"


# ----------------------------------------------------------------- packages

@dataclass
class Injected:
    """A fault in force: what it is, and how to undo it."""

    kind: str
    description: str
    nodes: list[int]
    undo: Callable[[], None]
    detail: dict = field(default_factory=dict)


class Package:
    """One kind of fault; ``inject`` applies it now and says how to undo it."""

    name = "package"
    kind = "fault"

    def inject(self, ctl: ClusterControl, rng: random.Random) -> Injected:
        raise NotImplementedError


def _leader_or_random(ctl: ClusterControl, rng: random.Random,
                      exclude: AbstractSet[int] = frozenset()) -> tuple[int, str]:
    leader = ctl.leader()
    if leader is not None and leader not in exclude:
        return leader, f"leader n{leader}"
    choice = rng.choice([n for n in ctl.nodes if n not in exclude] or ctl.nodes)
    return choice, f"n{choice} (no leader known)"


class Partition(Package):
    kind = "partition"

    def __init__(self, shape: str) -> None:
        if shape not in ("halves", "leader", "ring", "bridge"):
            raise ValueError(f"unknown partition shape {shape!r}")
        self.shape = shape
        self.name = f"partition-{shape}"

    def inject(self, ctl: ClusterControl, rng: random.Random) -> Injected:
        nodes = list(ctl.nodes)
        if self.shape == "halves":
            components = halves(nodes, rng)
            grudge = grudge_of(components)
            what = "halves " + " | ".join("{" + ",".join(f"n{n}" for n in c) + "}" for c in components)
        elif self.shape == "leader":
            target, who = _leader_or_random(ctl, rng)
            grudge = grudge_of(isolate(target, nodes))
            what = f"isolate {who}"
        elif self.shape == "ring" and len(nodes) >= 5:
            grudge = majority_ring(nodes, rng)
            what = "majority ring"
        else:
            grudge, middle = bridge(nodes, rng)
            what = f"bridge through n{middle}" + (" (ring needs 5+ nodes)" if self.shape == "ring" else "")
        ctl.partition(grudge)
        cut_off = sorted(n for n, bs in grudge.items() if bs)
        return Injected("partition", f"{what}: {describe_grudge(grudge)}", cut_off, ctl.heal_network,
                        {"grudge": {str(a): sorted(bs) for a, bs in grudge.items()}})


class ProcessFault(Package):
    """A fault done to one node's process: kill -9 (restart at heal) or SIGSTOP (SIGCONT at heal)."""

    ACTIONS = {
        "kill": ("kill -9 {who}, restart at heal", "kill", "restart"),
        "pause": ("SIGSTOP {who}, SIGCONT at heal", "pause", "resume"),
    }

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        self.target = target
        self.name = f"{kind}-{target}"

    def inject(self, ctl: ClusterControl, rng: random.Random) -> Injected:
        if self.target == "leader":
            node, who = _leader_or_random(ctl, rng)
        else:
            node = rng.choice(ctl.nodes)
            who = f"n{node}"
        describe, act, undo = self.ACTIONS[self.kind]
        getattr(ctl, act)(node)
        return Injected(self.kind, describe.format(who=who), [node], lambda: getattr(ctl, undo)(node))


class Rotate(Package):
    """Takes turns among several packages (``partition`` = all four shapes)."""

    def __init__(self, name: str, packages: list[Package]) -> None:
        self.name = name
        self.packages = packages
        self.kind = packages[0].kind
        self._turn = 0

    def inject(self, ctl: ClusterControl, rng: random.Random) -> Injected:
        package = self.packages[self._turn % len(self.packages)]
        self._turn += 1
        return package.inject(ctl, rng)


def make_package(name: str) -> Package:
    name = name.strip().lower()
    from kvstore.jepsen import power  # its own module (it imports this one)
    if name in power.NAMES:
        return power.make_power_package(name)
    shapes = ("halves", "leader", "ring", "bridge")
    if name == "partition":
        return Rotate(name, [Partition(s) for s in shapes])
    if name.startswith("partition-"):
        return Partition(name.split("-", 1)[1])
    for kind in ProcessFault.ACTIONS:
        if name == kind:
            return Rotate(name, [ProcessFault(kind, "random"), ProcessFault(kind, "leader")])
        if name in (f"{kind}-random", f"{kind}-leader"):
            return ProcessFault(kind, name.split("-", 1)[1])
    if name == "member":
        from kvstore.jepsen.member import MemberNemesis

        return MemberNemesis()
    if name.startswith("clock"):
        from kvstore.jepsen.clock import make_clock_package

        return make_clock_package(name)
    raise ValueError(f"unknown nemesis {name!r}: use partition[-halves|-leader|-ring|-bridge], "
                     "kill[-random|-leader], pause[-random|-leader], power[-random|-leader|-all], clock, member, "
                     "joined with , or +")


def parse_spec(spec: str) -> list[list[Package]]:
    """``"partition,kill+pause"`` -> [[partition], [kill, pause]]; ``none`` or empty -> []."""
    if not spec or spec.strip().lower() in ("none", "noop"):
        return []
    return [[make_package(p) for p in window.split("+")] for window in spec.split(",") if window.strip()]


# ----------------------------------------------------------------- schedule

class Nemesis(threading.Thread):
    """Runs fault windows in a loop: heal period, fault period, heal period, ...

    Starts with a heal period so the cluster is serving when the first fault
    lands. :meth:`stop` ends the schedule and undoes whatever is in force.
    """

    def __init__(self, ctl: ClusterControl, windows: list[list[Package]], recorder: Recorder,
                 fault_seconds: float = 5.0, heal_seconds: float = 5.0,
                 seed: int | None = None, on_error: Callable[[BaseException], None] | None = None
                 ) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.ctl = ctl
        self.windows = windows
        self.recorder = recorder
        self.fault_seconds = fault_seconds
        self.heal_seconds = heal_seconds
        self.rng = random.Random(seed)
        self.on_error = on_error
        self._stopping = threading.Event()
        self._active: list[tuple[Injected, Fault]] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def run(self) -> None:
        turn = 0
        try:
            while self.windows and not self._stopping.wait(self.heal_seconds):
                window = self.windows[turn % len(self.windows)]
                turn += 1
                for package in window:
                    self._inject(package)
                self._stopping.wait(self.fault_seconds)
                self.heal()
        except BaseException as error:  # a nemesis that dies must not leave faults behind
            self.errors.append(repr(error))
            if self.on_error:
                self.on_error(error)
        finally:
            self.heal()

    def _inject(self, package: Package) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            try:
                injected = package.inject(self.ctl, self.rng)
            except Exception as error:  # e.g. no node to act on: record and go on
                self.errors.append(f"{package.name}: {error!r}")
                return
            fault = self.recorder.fault_started(injected.kind, injected.description,
                                                injected.nodes, package=package.name,
                                                **injected.detail)
            self._active.append((injected, fault))

    def heal(self) -> None:
        """Undo every fault in force, newest first (resume before healing the network)."""
        with self._lock:
            while self._active:
                injected, fault = self._active.pop()
                try:
                    injected.undo()
                except Exception as error:
                    self.errors.append(f"undo {injected.description}: {error!r}")
                self.recorder.fault_ended(fault)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)
        self.heal()
