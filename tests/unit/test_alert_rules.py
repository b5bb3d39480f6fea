"""deploy/prometheus/alerts.yml: valid rules (`promtool check rules`) that pass their unit tests
(`promtool test rules alerts_test.yml`), and tests that fail when a rule is broken."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                                          "prometheus; `make system-deps` does it as root)")


def promtool(*args: str, cwd: str = DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_are_valid():
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout


def test_rules_pass_their_unit_tests():
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("alert, old, new", [
    ("kvstoreNoLeader", "kvstore_server_has_leader{job=~\".*kvstore.*\"} == 0", "kvstore_server_has_leader == 2"),
    ("kvstoreMembersDown", "kvstore_network_active_peers{job=~\".*kvstore.*\"}) == 0",
     "kvstore_network_active_peers{job=~\".*kvstore.*\"}) == 2"),
    ("kvstoreCorruptionDetected", "alarm=\"CORRUPT\"}) > 0", "alarm=\"CORRUPT\"}) > 1"),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path, alert, old, new):
    """Teeth: with one rule's expression broken, `promtool test rules` fails and names that alert."""
    rules = open(os.path.join(DEPLOY, "alerts.yml")).read()
    assert old in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    shutil.copy(os.path.join(DEPLOY, "alerts_test.yml"), tmp_path)
    r = promtool("test", "rules", "alerts_test.yml", cwd=str(tmp_path))
    assert r.returncode != 0
    assert f"alertname: {alert}" in r.stdout + r.stderr
