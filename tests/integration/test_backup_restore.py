"""Backup round trip on real processes: `snapshot save` under writes, restore into a new 3-member cluster.

The backup must hold exactly the acknowledged writes up to its revision, and
the restored cluster's HashKV (all members agreeing) must equal the hash of
the file, at the same revision, under a new cluster id.
"""
from __future__ import annotations

import json
import os
import threading

from click.testing import CliRunner

from kvstore.cli import main
from kvstore.client import Client
from kvstore.launcher import LocalCluster
from kvstore.server.config import format_members


def kvstore(*args: str, code: int = 0) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == code, r.output
    return r.output


def test_backup_under_writes_restores_into_a_new_cluster(tmp_path):
    src = LocalCluster.with_free_ports(str(tmp_path / "src"))
    src.start()
    acked: dict[bytes, int] = {}  # key -> revision of its (only) write
    stop = threading.Event()
    try:
        src.wait_for_leader(60)
        with Client(src.endpoints, timeout=20) as c:
            def write() -> None:
                i = 0
                while not stop.is_set():
                    key = b"w%06d" % i
                    acked[key] = c.put(key, b"v%d" % i).revision
                    i += 1

            writer = threading.Thread(target=write)
            writer.start()
            try:
                src.wait_for(lambda: len(acked) >= 200, 60, "200 acknowledged writes")
                backup = str(tmp_path / "backup.db")
                out = kvstore("--endpoints", src.client_addr(2), "snapshot", "save", backup)
                assert "Snapshot saved" in out
                src.wait_for(lambda: len(acked) >= 400, 60, "writes going on after the backup")
            finally:
                stop.set()
                writer.join()
        st = json.loads(kvstore("snapshot", "status", backup, "-w", "json"))
    finally:
        src.stop()
    revision = st["revision"]
    assert st["totalKey"] == revision  # one put per key, nothing else
    assert 200 <= revision < max(acked.values())  # taken under the writes, not after them
    expect = {k for k, rev in acked.items() if rev <= revision}
    assert len(expect) >= revision - 1  # at most the write in flight was unacknowledged

    # restore each member of a new cluster from the file
    dst = LocalCluster.with_free_ports(str(tmp_path / "dst"))
    initial = format_members(dst.peer_addrs)
    for i in dst.ids:
        out = kvstore("snapshot", "restore", backup, "--data-dir", dst.data_dir(i), "--id", str(i),
                      "--initial-cluster", initial, "--initial-cluster-clients", format_members(dst.client_addrs),
                      "--initial-cluster-token", "restored-1")
        assert f"member {i}" in out
    dst.start()
    try:
        dst.wait_for_leader(60)
        with Client(dst.endpoints, timeout=20) as c:
            addr, mark = c.hash_kv(0)
            assert (mark.revision, mark.hash) == (revision, st["hash"])
            assert mark.header.cluster_id not in (0,)
            for ep in dst.endpoints:  # every member holds the same state at the barrier
                _, m = c.hash_kv(mark.index, ep)
                assert (m.revision, m.hash) == (revision, st["hash"])
            assert sorted(m.id for m in c.members()) == [1, 2, 3]
            assert {m.peer_urls[0] for m in c.members()} == set(dst.peer_addrs.values())  # the new cluster's
            got = {kv.key for kv in c.range(b"w", b"x").kvs}
            assert expect <= got and len(got) == revision
            assert c.put(b"after", b"restore").revision == revision + 1  # the new cluster takes writes
    finally:
        dst.stop()


def test_damaged_backup_is_refused_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\0" * 8192)
    out = kvstore("snapshot", "status", str(bad), code=1)
    assert "not a kvstore backup" in out
    target = tmp_path / "node1"
    out = kvstore("snapshot", "restore", str(bad), "--data-dir", str(target), "--id", "1",
                  "--initial-cluster", "1=127.0.0.1:1", code=1)
    assert "not a kvstore backup" in out and not os.path.exists(target)
