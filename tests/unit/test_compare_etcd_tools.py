"""`make bench` (benchmarks/compare_etcd.py) without etcd's tools says in one line what to install."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_missing_etcdctl_is_one_line_naming_the_packages(tmp_path):
    fake_etcd = tmp_path / "etcd"  # etcd-server installed, etcd-client not: the case met on a fresh machine
    fake_etcd.write_text("#!/bin/sh\nexit 1\n")
    fake_etcd.chmod(0o755)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_etcd.py"), "--secs", "0.1"],
                       env={**os.environ, "PATH": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "etcdctl not found" in lines[0] and "etcd-client" in lines[0] and "etcd-server" in lines[0]
    assert "etcd and" not in lines[0]  # etcd itself was found
