"""The WAL's directory fsync (segment creation, compaction) fails like its fdatasync: named and poisoning.

Real fault injection: the script runs under `strace -e inject=fsync:error=EIO -P DIR`,
so only the fsync of the log's directory fails, and only the one asked for.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {ROOT!r})
    from kvstore.raft.types import Entry
    from kvstore.storage.wal import Wal, WalFsyncError
    w = Wal(sys.argv[1], 8192)

    def fill():
        for i in range(1, 301):
            w.append([Entry(1, i, data=b"x" * 100)])

    steps = (("fill", fill), ("snapshot", lambda: w.write_snapshot(250, 1, [1])),
             ("compact", lambda: w.compact(250)), ("append", lambda: w.append([Entry(1, 301, data=b"y")])))
    for what, call in steps:
        try:
            call()
            print(what, "ok", len(w.segment_paths()), flush=True)
        except WalFsyncError as e:
            print(what, "failed:", e, flush=True)
""")

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


def run(path: str, inject_when: int | None) -> list[str]:
    cmd = [sys.executable, "-c", SCRIPT, path]
    if inject_when is not None:
        cmd = ["strace", "-f", "-q", "-o", os.devnull, "-e", "trace=fsync", "-P", path,
               "-e", f"inject=fsync:error=EIO:when={inject_when}", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip("strace not permitted here")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def test_a_failed_directory_fsync_in_compaction_names_the_directory_and_poisons_the_log(tmp_path):
    clean = run(str(tmp_path / "clean"), None)
    assert [line.split()[:2] for line in clean] == [["fill", "ok"], ["snapshot", "ok"], ["compact", "ok"],
                                                     ["append", "ok"]]
    segments = int(clean[1].split()[2])
    assert segments > 2  # compaction drops whole segments: there are some to drop
    # One directory fsync per segment created (the first one included); compaction's is the next.
    d = str(tmp_path / "faulty")
    out = run(d, segments + 1)
    assert out[:2] == [f"fill ok {segments}", f"snapshot ok {segments}"]
    assert out[2] == f"compact failed: fsync {d}: [Errno 5] Input/output error"
    assert out[3].startswith(f"append failed: write {d}: [Errno 5] WAL is unusable after an earlier failure")


def test_a_failed_directory_fsync_of_a_new_segment_names_the_directory_and_poisons_the_log(tmp_path):
    d = str(tmp_path / "faulty")
    out = run(d, 2)  # the first segment's fsync is at creation; the second segment's fails
    assert out[0] == f"fill failed: fsync {d}: [Errno 5] Input/output error"
    assert all("unusable after an earlier failure" in line for line in out[1:]), out
