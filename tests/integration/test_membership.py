"""Membership changes on real processes (the issue's done-when run).

3 members -> add learner 4 -> promote it -> remove member 1 while it leads ->
add 5 -> kill -9 one member, with writes going on throughout. Then every
acknowledged write is read back from each remaining member, and each one's
member list is right.
"""
from __future__ import annotations

import threading

import grpc

from click.testing import CliRunner

from kvstore.cli import main
from kvstore.client import Client, KvstoreError
from kvstore.launcher import LocalCluster
from kvstore.server.config import format_members
from tests.integration.server_cluster import cluster_stub
from kvstore.v1 import cluster_pb2


def kvstore(lc: LocalCluster, ids, *args: str, code: int = 0) -> str:
    eps = ",".join(lc.client_addr(i) for i in ids)
    r = CliRunner().invoke(main, ["--endpoints", eps, "--timeout", "20", *args])
    assert r.exit_code == code, r.output
    return r.output


def start_flags(lc: LocalCluster, ids, existing: bool) -> list[str]:
    flags = ["--initial-cluster", format_members({i: lc.peer_addr(i) for i in ids}),
             "--initial-cluster-clients", format_members({i: lc.client_addr(i) for i in ids})]
    return flags + (["--initial-cluster-state", "existing"] if existing else [])


def member_list(lc: LocalCluster, i: int) -> list[tuple[int, bool]] | None:
    """Member i's own view of the members: (id, is_learner), sorted; None if it does not answer."""
    try:
        resp = cluster_stub(lc.client_addr(i)).MemberList(cluster_pb2.MemberListRequest(), timeout=5)
    except grpc.RpcError:
        return None
    return sorted((m.id, m.is_learner) for m in resp.members)


def test_add_learner_promote_remove_leader_add_kill(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), nodes=5)
    for i in (1, 2, 3):
        lc.node_args[i] = start_flags(lc, (1, 2, 3), existing=False)
        lc.start_node(i)
    acked: dict[bytes, bytes] = {}
    stop = threading.Event()
    try:
        lc.wait_for_leader(60)

        def write() -> None:
            with Client([lc.client_addr(i) for i in (1, 2, 3)], timeout=10) as c:
                n = 0
                while not stop.is_set():
                    key, value = b"m%06d" % n, b"v%d" % n
                    n += 1
                    try:
                        c.put(key, value)
                    except KvstoreError:
                        continue  # not acknowledged: not checked
                    acked[key] = value

        writer = threading.Thread(target=write)
        writer.start()
        lc.wait_for(lambda: len(acked) > 50, 60, "writes before the first change")

        out = kvstore(lc, (1, 2, 3), "member", "add", "node4", "--peer-urls", lc.peer_addr(4),
                      "--client-urls", lc.client_addr(4), "--learner")
        assert "Member 4 (node4) added as a learner" in out and "--initial-cluster-state existing" in out
        lc.node_args[4] = start_flags(lc, (1, 2, 3, 4), existing=True)
        lc.start_node(4)
        assert member_list(lc, 1) == [(1, False), (2, False), (3, False), (4, True)]

        def promoted():
            r = CliRunner().invoke(main, ["--endpoints", lc.client_addr(1), "--timeout", "5", "member", "promote", "4"])
            if r.exit_code == 0:
                return True
            assert "behind the leader" in r.output or "not been heard from" in r.output, r.output
            return None

        lc.wait_for(promoted, 60, "learner 4 caught up and promoted", interval=0.5)
        lc.wait_for(lambda: member_list(lc, 4) == [(1, False), (2, False), (3, False), (4, False)], 30,
                    "member 4 seeing itself a voter")

        if lc.leader() != 1:
            kvstore(lc, (1, 2, 3), "leader", "transfer", "--to", "1")
        assert lc.leader() == 1
        kvstore(lc, (1, 2, 3), "member", "remove", "1")
        lc.wait_for(lambda: not lc.is_running(1), 30, "removed member 1 stopping itself")
        with open(lc.log_path(1)) as f:
            assert "member 1 was removed from the cluster; stopping" in f.read()
        new_leader = lc.wait_for_leader(60)
        assert new_leader in (2, 3, 4)

        out = kvstore(lc, (2, 3, 4), "member", "add", "node5", "--peer-urls", lc.peer_addr(5),
                      "--client-urls", lc.client_addr(5))
        assert "Member 5 (node5) added as a voter" in out
        lc.node_args[5] = start_flags(lc, (2, 3, 4, 5), existing=True)
        lc.start_node(5)
        lc.wait_for(lambda: (st := lc.status(5)) is not None and st.applied_index > 0 or None, 60,
                    "member 5 applying")

        victim = next(i for i in (2, 3, 4) if i != lc.leader())
        lc.kill(victim)
        n = len(acked)
        lc.wait_for(lambda: len(acked) > n + 20, 60, "writes going on after the kill")
    finally:
        stop.set()
    writer.join()
    try:
        remaining = [i for i in (2, 3, 4, 5) if i != victim]
        leader = lc.wait_for_leader(60)
        target = lc.status(leader).commit_index
        for i in remaining:
            lc.wait_for(lambda i=i: (st := lc.status(i)) is not None and st.applied_index >= target or None, 60,
                        f"member {i} applying everything")
            assert member_list(lc, i) == [(2, False), (3, False), (4, False), (5, False)]
            with Client([lc.client_addr(i)], timeout=20) as c:
                got = {kv.key: kv.value for kv in c.range(b"m", b"n", serializable=True).kvs}
            missing = [k for k, v in acked.items() if got.get(k) != v]
            assert not missing, f"member {i} lacks {len(missing)} acknowledged writes, e.g. {missing[:3]}"
        assert len(acked) > 100
    finally:
        lc.stop()
