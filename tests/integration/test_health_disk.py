"""/health turns 503 while the leader's WAL fsync hangs (a frozen filesystem), and 200 once it returns.

A real hung disk: the data directory lives on a loop-mounted ext4 image that
the test freezes with fsfreeze(8), so the next fdatasync blocks in the
kernel until the thaw. Root only (mount, fsfreeze); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

import pytest

from kvstore.client import Client
from kvstore.launcher import LocalCluster
from kvstore.server.health import WAL_STUCK_S
from tests.integration.metrics_cluster import http_get


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


@pytest.fixture
def freezable_dir(tmp_path):
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("fsfreeze", "mkfs.ext4", "mount")):
        pytest.skip("needs root, fsfreeze, mkfs.ext4 and mount (util-linux, e2fsprogs)")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    if run("mkfs.ext4", "-q", "-F", str(image)).returncode != 0:
        pytest.skip("mkfs.ext4 failed")
    r = run("mount", "-o", "loop", str(image), str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount an image here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        run("fsfreeze", "-u", str(mnt))
        run("umount", "-l", str(mnt))


def test_health_reports_a_hung_wal_fsync_until_it_returns(tmp_path, freezable_dir):
    # One member: always the leader, whose WAL appends run on the storage thread, so its event
    # loop (and the HTTP endpoints on it) keeps answering while the fsync hangs. Logs stay off
    # the frozen filesystem.
    lc = LocalCluster.with_free_ports(str(tmp_path / "cluster"), nodes=1,
                                      node_args={1: ["--data-dir", str(freezable_dir / "node1")]})
    with lc:
        lc.wait_for_leader(60)
        with Client(lc.endpoints, timeout=60) as c:
            c.put("before", "1")
            assert http_get(lc.metrics_url(1, "/health"))[0] == 200
            assert run("fsfreeze", "-f", str(freezable_dir)).returncode == 0
            done = threading.Event()
            writer = threading.Thread(target=lambda: (c.put("during", "2"), done.set()), daemon=True)
            try:
                writer.start()

                def stuck():
                    status, body = http_get(lc.metrics_url(1, "/health"))
                    return json.loads(body) if status == 503 else None

                body = lc.wait_for(stuck, WAL_STUCK_S + 20, "/health turning 503 while the fsync hangs")
                assert body["health"] == "false" and body["reason"].startswith("WAL FSYNC STUCK FOR ")
                assert http_get(lc.metrics_url(1, "/livez"))[0] == 200
                assert not done.is_set()  # the write waits for its fsync
            finally:
                run("fsfreeze", "-u", str(freezable_dir))
            writer.join(60)
            assert done.is_set()
            lc.wait_for(lambda: http_get(lc.metrics_url(1, "/health"))[0] == 200, 30, "/health back to 200")
            assert c.get("during").value == b"2"
