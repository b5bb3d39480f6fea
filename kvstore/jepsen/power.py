"""The power nemesis: members lose power, and with it everything they had not synced.

Packages (names for ``--nemesis``):

- ``power``: alternates ``power-random`` and ``power-leader``: one member's
  power is cut; it comes back (and its node restarts) when the window ends.
- ``power-all``: every member at once.

A cut is what a machine sees when the plug is pulled (see
:mod:`kvstore.jepsen.disk`): the member's file system is shut down without
writing back its dirty pages or its journal, the node process is killed, the
disk unmounted. At heal the disk is mounted again (journal replay) and the
node restarted under a *new boot id*: it is another boot of that machine, so
the state machine's boot guard (:mod:`kvstore.storage.boot_guard`) must treat
unsynced LMDB commits as torn. Each member has its own boot id from the start
(members are separate machines), presented through the guard's test-only
override, ``KVSTORE_TESTING_BOOT_ID``; a kill -9 keeps it (same boot).

The runner gives each member its disk (:class:`PowerSupply`) only when the
spec holds a power package; without root or loop devices the run stops
before it starts, with the reason. With ``--keep-data`` the images are kept
(``node<i>.ext4``; ``mount -o loop`` one to look inside).
"""
from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, cast

from kvstore.jepsen.disk import DiskRoot, LoopDisk, power_unsupported
from kvstore.jepsen.nemesis import ClusterControl, Injected, Package, Rotate
from kvstore.storage.boot_guard import TESTING_BOOT_ID_ENV

__all__ = ["NAMES", "PowerCut", "PowerSupply", "make_power_package", "needs_power"]

NAMES = ("power", "power-random", "power-leader", "power-all")


class PowerControl(ClusterControl, Protocol):
    """What the power packages need beyond the common cluster control."""

    def cut_power(self, nodes: list[int]) -> None: ...
    def restore_power(self, nodes: list[int]) -> None: ...


class PowerCut(Package):
    """Cut one member's power (``random``, ``leader``) or every member's (``all``)."""

    kind = "power"

    def __init__(self, target: str) -> None:
        if target not in ("random", "leader", "all"):
            raise ValueError(f"unknown power target {target!r}")
        self.target = target
        self.name = f"power-{target}"

    def inject(self, ctl: ClusterControl, rng: random.Random) -> Injected:
        power = cast(PowerControl, ctl)
        leader = ctl.leader() if self.target == "leader" else None
        if self.target == "all":
            nodes, who = sorted(ctl.nodes), "every member"
        elif leader is not None:
            nodes, who = [leader], f"leader n{leader}"
        else:
            node = rng.choice(ctl.nodes)
            nodes, who = [node], f"n{node}" + (" (no leader known)" if self.target == "leader" else "")
        power.cut_power(nodes)
        return Injected("power", f"power cut {who}: unsynced writes lost; back under a new boot id at heal",
                        nodes, lambda: power.restore_power(nodes))


def make_power_package(name: str) -> Package:
    """The package for one of :data:`NAMES`."""
    if name == "power":
        return Rotate(name, [PowerCut("random"), PowerCut("leader")])
    return PowerCut(name.split("-", 1)[1])


def needs_power(windows: Sequence[Sequence[Package]]) -> bool:
    """Whether a parsed nemesis spec cuts power (then every member needs its own disk)."""
    return any(package.kind == "power" for window in windows for package in window)


class PowerSupply:
    """Every member's disk and boot id, for a cluster whose data dirs are ``root/node<i>``.

    Use as a context manager around the cluster's whole life: it mounts the
    disks before the first start and unmounts them (cleanly) after the last stop.
    """

    def __init__(self, root: str | Path, nodes: Sequence[int]) -> None:
        self.root = DiskRoot(root)
        self.disks = {n: LoopDisk(self.root.path / f"node{n}.ext4", self.root.path / f"node{n}")
                      for n in nodes}
        self.boot_ids = {n: str(uuid.uuid4()) for n in nodes}

    def __enter__(self) -> PowerSupply:
        why = power_unsupported()
        if why:
            raise RuntimeError(f"the power nemesis cannot run here: {why}")
        self.root.__enter__()
        try:
            for disk in self.disks.values():
                disk.create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for disk in self.disks.values():
                disk.unmount()
        finally:
            self.root.__exit__()

    def powered(self, node: int) -> bool:
        return self.disks[node].powered

    def env(self, node: int) -> dict[str, str]:
        """What the member's node process must see: this boot's id."""
        return {TESTING_BOOT_ID_ENV: self.boot_ids[node]}

    def cut(self, nodes: Sequence[int], kill: Callable[[int], None]) -> None:
        """Shut every disk down first (as close to the same instant as can be), then kill, then unmount.

        A member already without power (two power windows at once) is left as it is.
        """
        nodes = [n for n in nodes if self.disks[n].powered]
        for node in nodes:
            self.disks[node].cut()
        for node in nodes:
            kill(node)
        for node in nodes:
            self.disks[node].unmount()

    def restore(self, nodes: Sequence[int]) -> None:
        """Power back on: mount again (journal replay) and begin a new boot."""
        for node in nodes:
            if self.disks[node].powered:
                continue
            self.disks[node].power_on()
            self.boot_ids[node] = str(uuid.uuid4())

    def cuts(self) -> dict[int, int]:
        return {n: d.cuts for n, d in self.disks.items()}
