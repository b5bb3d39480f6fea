"""Power cuts at random points under load lose no acknowledged write (see power_crash.py)."""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

from kvstore.jepsen.disk import power_unsupported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from power_crash import PowerCrashRig

WHY = power_unsupported()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def _run_cycles(tmp_path: Path, cycles: int, load_seconds: float) -> PowerCrashRig:
    rng = random.Random(int(os.environ.get("POWER_CRASH_SEED", "1")))
    started = time.monotonic()
    # Teeth: POWER_CRASH_TESTING_BREAK=same-boot or skip-wal-fsync must make this fail.
    with PowerCrashRig(tmp_path, rng, os.environ.get("POWER_CRASH_TESTING_BREAK", "")) as rig:
        for _ in range(cycles):
            rig.cycle(load_seconds)
        snapshots = rig.cluster.log_tail(1, 1_000_000).count("snapshot saved at index")
    tally = rig.tally
    load, restart, check = (sum(s[i] for s in tally.seconds) for i in range(3))
    print(f"{tally.cycles} power cuts in {time.monotonic() - started:.1f}s: {tally.acked_total} puts "
          f"acknowledged, {len(tally.present)} present, {len(tally.attempted)} attempted, {len(tally.repairs)} torn-tail repairs; {snapshots} snapshots; seconds: load {load:.1f}, "
          f"restart {restart:.1f}, check {check:.1f}")
    assert tally.cycles == cycles
    assert tally.acked_total > 10 * cycles  # the cuts really landed under load
    assert snapshots > 0  # snapshot creation and log compaction were among the crash points
    return rig


def test_power_cuts_under_load_lose_no_acknowledged_write(tmp_path: Path) -> None:
    _run_cycles(tmp_path, 20, load_seconds=0.6)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~3 s a cut on a loaded 2-core machine
def test_two_hundred_power_cuts_under_load(tmp_path: Path) -> None:
    _run_cycles(tmp_path, 200, load_seconds=1.5)
