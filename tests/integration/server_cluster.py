"""Helpers for tests that drive real node processes: stubs, trailing metadata, waits."""
from __future__ import annotations

import grpc

from kvstore.launcher import LocalCluster
from kvstore.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2_grpc


def kv_stub(addr: str) -> kv_pb2_grpc.KVStub:
    return kv_pb2_grpc.KVStub(grpc.insecure_channel(addr))


def cluster_stub(addr: str) -> cluster_pb2_grpc.ClusterStub:
    return cluster_pb2_grpc.ClusterStub(grpc.insecure_channel(addr))


def trailing(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


def settled(lc: LocalCluster, timeout: float = 60.0) -> int:
    """Every member running, answering, naming the same leader, and fully applied; the leader."""
    for i in lc.ids:
        lc.resume(i)
        if not lc.is_running(i):
            lc.start_node(i)

    def agreed():
        sts = lc.statuses(1.0)
        if any(s is None for s in sts.values()):
            return None
        leaders = {s.leader_id for s in sts.values()}
        applied = {s.applied_index for s in sts.values()}
        if len(leaders) == 1 and 0 not in leaders and len(applied) == 1:
            return leaders.pop()
        return None

    return lc.wait_for(agreed, timeout, "all members agreeing on a leader")


def caught_up(lc: LocalCluster, i: int, timeout: float = 60.0) -> cluster_pb2.StatusResponse:
    """Wait until member i has applied everything the leader has committed (as of the call)."""
    leader = lc.wait_for_leader(timeout)
    target = lc.status(leader).commit_index

    def done():
        st = lc.status(i)
        return st if st is not None and st.applied_index >= target else None

    return lc.wait_for(done, timeout, f"member {i} applying up to {target}")
