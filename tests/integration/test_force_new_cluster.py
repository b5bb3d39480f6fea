"""Disaster recovery: two of three data dirs lost; the survivor restarts with --force-new-cluster
and the cluster is grown back to three members. No acknowledged write is lost."""
from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from kvstore.cli import main
from kvstore.client import Client
from kvstore.launcher import LocalCluster
from kvstore.server.config import format_members


def kvstore(lc: LocalCluster, ids, *args: str) -> str:
    r = CliRunner().invoke(main, ["--endpoints", ",".join(lc.client_addr(i) for i in ids), "--timeout", "20", *args])
    assert r.exit_code == 0, r.output
    return r.output


def flags(lc: LocalCluster, ids, *extra: str) -> list[str]:
    return ["--initial-cluster", format_members({i: lc.peer_addr(i) for i in ids}),
            "--initial-cluster-clients", format_members({i: lc.client_addr(i) for i in ids}), *extra]


def test_survivor_forms_a_new_cluster_and_grows_back(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), nodes=5)
    for i in (1, 2, 3):
        lc.node_args[i] = flags(lc, (1, 2, 3))
        lc.start_node(i)
    try:
        lc.wait_for_leader(60)
        acked = {}
        with Client([lc.client_addr(i) for i in (1, 2, 3)], timeout=20) as c:
            for n in range(300):
                acked[b"d%04d" % n] = c.put(b"d%04d" % n, b"v%d" % n).revision
        # The survivor is the leader: it answers a write only once the write is durable in its own log, so
        # it holds every acknowledged one (any other member may lack the last few: a quorum is two of three).
        s = lc.leader()
        lost = [i for i in (1, 2, 3) if i != s]
        for i in (1, 2, 3):
            lc.kill(i)  # the disaster: every process gone, and two disks with them
        for i in lost:
            shutil.rmtree(lc.data_dir(i))

        lc.node_args[s] = flags(lc, (1, 2, 3), "--force-new-cluster")
        lc.start_node(s)
        assert lc.wait_for_leader(60) == s
        lc.node_args[s] = flags(lc, (1, 2, 3))  # a later restart must not force again
        doc = json.loads(kvstore(lc, (s,), "member", "list", "-w", "json"))
        assert [m["ID"] for m in doc["members"]] == [s]
        with Client([lc.client_addr(s)], timeout=20) as c:
            got = {kv.key: kv.mod_revision for kv in c.range(b"d", b"e").kvs}
        assert got == acked  # every acknowledged write, at its revision

        # grow back: the lost members come back as new members (ids are never reused) on empty disks
        for new in (4, 5):
            out = kvstore(lc, (s,), "member", "add", f"node{new}", "--peer-urls", lc.peer_addr(new),
                          "--client-urls", lc.client_addr(new), "--learner")
            assert f"Member {new} (node{new}) added as a learner" in out
            lc.node_args[new] = flags(lc, (s, 4, 5)[: new - 2], "--initial-cluster-state", "existing")
            lc.start_node(new)

            def promoted(new=new):
                r = CliRunner().invoke(main, ["--endpoints", lc.client_addr(s), "member", "promote", str(new)])
                return r.exit_code == 0 or None

            lc.wait_for(promoted, 60, f"member {new} promoted", interval=0.5)
        doc = json.loads(kvstore(lc, (s, 4, 5), "member", "list", "-w", "json"))
        assert sorted(m["ID"] for m in doc["members"]) == sorted([s, 4, 5])
        assert not any(m.get("isLearner") for m in doc["members"])
        lc.kill(s)  # the old survivor may go now: 4 and 5 are a quorum of three and hold everything
        lc.wait_for_leader(60)
        for i in (4, 5):
            with Client([lc.client_addr(i)], timeout=20) as c:
                got = {kv.key: kv.mod_revision for kv in c.range(b"d", b"e", serializable=True).kvs}
            assert got == acked, f"member {i}"
    finally:
        lc.stop()
