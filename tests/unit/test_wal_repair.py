"""A reordered torn write in the last WAL batch: refused at start, named, repaired on demand.

The case: a power cut during a batch's fdatasync persisted a later sector of
the batch but not an earlier one. The WAL sees a bad record followed by good
ones; it refuses to open, and `kvstore wal repair` cuts there and says what it
dropped.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.raft.types import Entry
from kvstore.storage.wal import Wal, WalCorruptionError
from kvstore.storage.wal_repair import describe, repair

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ents(lo: int, hi: int, size: int = 300) -> list[Entry]:
    return [Entry(1, i, data=bytes([65 + i % 26]) * size) for i in range(lo, hi)]


def _segment(wal_dir: str) -> str:
    return os.path.join(wal_dir, sorted(n for n in os.listdir(wal_dir) if n.endswith(".wal"))[-1])


def _reordered_torn_batch(data_dir: str) -> tuple[str, int]:
    """Entries 1..20 synced in one batch, 21..40 in a second batch whose first sector 'never made it'."""
    wal_dir = os.path.join(data_dir, "wal")
    with Wal(wal_dir, 1 << 16) as w:
        w.append(_ents(1, 21), (1, 1, 20))
        first_batch_end = _records_end(_segment(wal_dir))
        w.append(_ents(21, 41), (1, 1, 20))
    seg = _segment(wal_dir)
    hole = (first_batch_end // 512 + 1) * 512  # the first whole sector of the second batch
    with open(seg, "r+b") as f:
        f.seek(hole)
        f.write(bytes(512))
    return seg, first_batch_end


def _records_end(seg: str) -> int:
    data = open(seg, "rb").read()
    return len(data.rstrip(b"\0"))


def test_the_wal_refuses_a_hole_followed_by_intact_records(tmp_path):
    seg, _ = _reordered_torn_batch(str(tmp_path))
    with pytest.raises(WalCorruptionError, match="valid record follows") as err:
        Wal(str(tmp_path / "wal"), 1 << 16)
    assert err.value.path == seg


def test_repair_cuts_at_the_damaged_record_and_reports_what_it_dropped(tmp_path):
    seg, first_batch_end = _reordered_torn_batch(str(tmp_path))
    dropped = repair(str(tmp_path))
    assert dropped is not None
    assert dropped["path"] == seg and first_batch_end <= dropped["offset"] < first_batch_end + 512 + 332
    assert dropped["last_index"] >= 20 and dropped["entries_after"] > 0
    assert dropped["dropped_through"] == 40
    line = describe(dropped)
    assert seg in line and f"offset {dropped['offset']}" in line and "up to index 40" in line
    with Wal(str(tmp_path / "wal"), 1 << 16) as w:  # opens now, every entry before the hole intact
        assert w.last_index == dropped["last_index"]
        assert [e[0] for e in w.entries(1, w.last_index + 1)] == list(range(1, w.last_index + 1))
        assert w.hard_state == (1, 1, 20)
    assert repair(str(tmp_path)) is None  # nothing left to repair


def test_the_cli_repairs_and_says_so_and_a_clean_wal_needs_nothing(tmp_path):
    _reordered_torn_batch(str(tmp_path))
    cmd = [sys.executable, "-m", "kvstore.cli", "wal", "repair", "--data-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("repaired ") and "dropped" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "nothing to repair" in again.stdout
    missing = subprocess.run([*cmd[:-1], str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                             timeout=60)
    assert missing.returncode == 1 and "no WAL at" in missing.stderr and "Traceback" not in missing.stderr


def test_a_node_refusing_the_wal_names_the_file_the_offset_and_the_repair(tmp_path):
    seg, _ = _reordered_torn_batch(str(tmp_path / "node1"))
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore.server.main", "--id", "1", "--data-dir", str(tmp_path / "node1"),
         "--initial-cluster", "1=127.0.0.1:1", "--initial-cluster-clients", "1=127.0.0.1:2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert proc.returncode != 0
    fatal = [line for line in proc.stderr.splitlines() if "FATAL" in line]
    assert len(fatal) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{seg} at offset" in fatal[0]
    assert f"kvstore wal repair --data-dir {tmp_path / 'node1'}" in fatal[0]
