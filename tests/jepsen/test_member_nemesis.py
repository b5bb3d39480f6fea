"""The member nemesis on a real cluster: members removed, wiped, added back as learners and promoted,
while the register workload stays linearizable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.jepsen.test_harness_cluster import FAST, assert_complete_run_dir, jepsen_run


@pytest.mark.slow
def test_register_under_member_changes_is_linearizable(tmp_path: Path) -> None:
    code, summary, run_dir = jepsen_run(tmp_path, "member", "--time", "20", "--nemesis", "member",
                                        "--workload", "register", "--network", "proxy", *FAST)
    assert_complete_run_dir(run_dir, summary)
    assert code == 0 and summary["valid"], summary["verdict"]
    assert summary["notes"] == []  # no change the nemesis asked for was refused or failed
    member_faults = [f for f in summary["faults"] if f["kind"] == "member"]
    assert len(member_faults) >= 2 and all(f["end"] is not None for f in member_faults)
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("node*.log"))
    promoted = {int(i) for voters in re.findall(r"members now \[([0-9, ]+)\] \(learners \[\]\)", logs)
                for i in voters.split(", ") if int(i) > 3}
    assert promoted, "no member added back was promoted"
    assert summary["ops"]["ok"] > 200
