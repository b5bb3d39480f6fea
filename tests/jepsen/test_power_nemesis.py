"""`kvstore jepsen run --nemesis power-all`: every member loses power at once, and nothing is lost.

A short set run through the CLI (as users run it): each member's data dir is
its own loop-mounted ext4 image, every window cuts them all, and each comes
back under a new boot id, so its boot guard discards the unsynced state
machine and rebuilds it from the WAL. The set checker then finds every
acknowledged add. The longer runs (register and set; power, power-all,
power,partition) are the ones in the soak.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kvstore.jepsen.disk import power_unsupported
from tests.jepsen.test_harness_cluster import FAST, assert_complete_run_dir, jepsen_run

WHY = power_unsupported()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")
REBOOTED = "unsynced commits from an earlier boot"  # the boot guard's warning (state_machine.py)


def _mounts_left(run_dir: Path) -> list[str]:
    """Mounts and loop devices still under the run's data root (named in the nodes' "data in DIR/nodeK" log line)."""
    match = re.search(r"data in (\S+)/node1\b", (run_dir / "logs" / "node1.log").read_text())
    assert match, "no data dir in node1's log"
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if match.group(1) in line]
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout
    return mounts + [line for line in loops.splitlines() if match.group(1) in line]


def test_power_all_loses_no_acknowledged_add(tmp_path: Path) -> None:
    code, summary, run_dir = jepsen_run(tmp_path, "power-all", "--time", "12", "--nemesis", "power-all",
                                        "--workload", "set", *FAST)
    assert_complete_run_dir(run_dir, summary)
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert code == 0 and verdict["valid"], verdict
    assert verdict["acknowledged"] > 50 and verdict["lost"] == []
    cuts = [f for f in summary["faults"] if f["kind"] == "power"]
    assert cuts and all(f["nodes"] == [1, 2, 3] and f["end"] is not None for f in cuts), summary["faults"]
    # Every member came back as a new boot: its guard saw unsynced commits from another one
    # (at most once a cut: a cut that lands before the restarted node armed its guard leaves none).
    for node in (1, 2, 3):
        seen = (run_dir / "logs" / f"node{node}.log").read_text().count(REBOOTED)
        assert 1 <= seen <= len(cuts), f"node{node}: {seen} reboots seen, {len(cuts)} cuts"
    assert _mounts_left(run_dir) == [], "the run left disks mounted or attached"


@pytest.mark.slow
@pytest.mark.parametrize("nemesis", ["power", "power-all", "power,partition"])
@pytest.mark.parametrize("workload", ["register", "set"])
def test_a_minute_of_power_cuts(tmp_path: Path, nemesis: str, workload: str) -> None:
    code, summary, run_dir = jepsen_run(tmp_path, "long", "--time", "60", "--nemesis", nemesis,
                                        "--workload", workload, timeout=400)
    assert_complete_run_dir(run_dir, summary)
    assert code == 0 and summary["valid"], summary["verdict"]
    assert summary["faults_by_kind"].get("power", 0) >= 2, summary["faults"]
