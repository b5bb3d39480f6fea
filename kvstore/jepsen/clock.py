"""The ``clock`` nemesis: one member's wall clock jumps an hour ahead or behind.

Every node of a run that uses it starts with a small LD_PRELOAD shim
(clock_skew.c, built here with the system C compiler) and its own skew file.
Writing ``+3600`` into a node's file moves that node's CLOCK_REALTIME
(time(), gettimeofday(), clock_gettime(CLOCK_REALTIME)) an hour ahead within a
second, while the process keeps running; ``+0`` puts it back. CLOCK_MONOTONIC
is left alone, as a settimeofday or an NTP step would leave it: this is a
wall-clock fault, not a process that skips ahead in time (that is ``pause``).

Why not libfaketime: it also wraps condition variables and sleeps, and under
thread contention it made a node's event loop stall (asyncio loop lag with a
busy second thread, p50 7 ms plain, 68-204 ms under libfaketime 0.9.10), which
caused elections that had nothing to do with the clock.

What must hold under it: no write applied twice (session expiry follows log
time, not a wall clock), no stale read, and no election storm (elections run
on ticks of the monotonic clock).

Packages: ``clock`` takes turns over the four below; ``clock-leader-ahead``,
``clock-leader-behind``, ``clock-random-ahead``, ``clock-random-behind`` (one
hour; the skew ends when the window heals).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

from kvstore.jepsen.nemesis import ClusterControl, Injected, Package, Rotate

SKEW_SECONDS = 3600
SHIM_SOURCE = Path(__file__).with_name("clock_skew.c")


def compiler() -> str | None:
    """The C compiler that builds the shim, or None."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build_shim(directory: Path) -> Path:
    """The shim library, built into `directory` (once per source version)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("the clock nemesis needs a C compiler (cc) to build its clock shim")
    source = SHIM_SOURCE.read_bytes()
    lib = directory / f"clock_skew-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not lib.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {SHIM_SOURCE} failed: {done.stderr.strip()}")
        os.replace(tmp, lib)
    return lib


def uses_clock(spec: str) -> bool:
    """Whether a nemesis spec has a clock package (its nodes must start with the shim)."""
    return any(p.strip().lower().startswith("clock") for w in spec.split(",") for p in w.split("+"))


class NodeClocks:
    """Each node's wall-clock offset, as the skew file its shim reads."""

    def __init__(self, directory: Path, nodes: list[int]) -> None:
        self.directory = directory
        self.lib = build_shim(directory)
        self.offsets: dict[int, int] = {}
        for node in nodes:
            self.set(node, 0)

    def path(self, node: int) -> Path:
        return self.directory / f"node{node}.skew"

    def env(self, node: int) -> dict[str, str]:
        """What node `node` must be started with."""
        return {"LD_PRELOAD": str(self.lib), "KVSTORE_CLOCK_SKEW_FILE": str(self.path(node))}

    def set(self, node: int, seconds: int) -> None:
        """Node `node`'s wall clock reads `seconds` off from now on (within a second)."""
        tmp = self.path(node).with_suffix(".tmp")
        tmp.write_text(f"{seconds:+d}\n")
        os.replace(tmp, self.path(node))  # never read half-written
        self.offsets[node] = seconds


class ClockSkew(Package):
    """Moves one node's wall clock `seconds` (the leader's, or a random node's); back at heal."""

    kind = "clock"

    def __init__(self, target: str, seconds: int) -> None:
        if target not in ("leader", "random"):
            raise ValueError(f"unknown clock target {target!r}")
        self.target = target
        self.seconds = seconds
        self.name = f"clock-{target}-{'ahead' if seconds > 0 else 'behind'}"

    def inject(self, ctl: ClusterControl, rng: random.Random) -> Injected:
        skew = getattr(ctl, "skew_clock", None)
        if skew is None:
            raise RuntimeError("this cluster was not started for the clock nemesis")
        leader = ctl.leader()
        if self.target == "leader" and leader is not None:
            node, who = leader, f"leader n{leader}"
        else:
            node = rng.choice(ctl.nodes)
            who = f"n{node}" + (" (no leader known)" if self.target == "leader" else "")
        skew(node, self.seconds)
        return Injected("clock", f"{who} wall clock {self.seconds:+d} s", [node],
                        lambda: skew(node, 0), {"seconds": self.seconds})


def make_clock_package(name: str) -> Package:
    """``clock`` or ``clock-{leader,random}-{ahead,behind}``."""
    if name == "clock":
        return Rotate(name, [ClockSkew("leader", SKEW_SECONDS), ClockSkew("random", -SKEW_SECONDS),
                             ClockSkew("leader", -SKEW_SECONDS), ClockSkew("random", SKEW_SECONDS)])
    parts = name.split("-")
    if len(parts) == 3 and parts[1] in ("leader", "random") and parts[2] in ("ahead", "behind"):
        return ClockSkew(parts[1], SKEW_SECONDS if parts[2] == "ahead" else -SKEW_SECONDS)
    raise ValueError(f"unknown nemesis {name!r}: use clock or clock-{{leader,random}}-{{ahead,behind}}")
