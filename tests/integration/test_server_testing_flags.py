"""The test-only unsafe modes exist, are off by default, and do what the Jepsen teeth tests need."""
from __future__ import annotations

import grpc
import pytest

from kvstore.launcher import LocalCluster
from kvstore.v1 import kv_pb2

from server_cluster import kv_stub, settled

pytestmark = pytest.mark.timeout(120)


def test_unsafe_flags(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), extra_args=["--testing-unsafe-local-reads",
                                                                  "--testing-ack-before-commit"])
    lc.start()
    try:
        leader = settled(lc)
        follower = next(i for i in lc.ids if i != leader)
        kv_stub(lc.client_addr(leader)).Put(kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=10)
        # Acknowledged before it committed: "every member at the same applied index" can
        # still be the index before the put. Wait for the follower to have applied it.
        local = kv_pb2.RangeRequest(key=b"k", serializable=True)
        lc.wait_for(lambda: kv_stub(lc.client_addr(follower)).Range(local, timeout=10).kvs, 60,
                    "the follower applying the put")
        # a follower answers a linearizable read itself instead of redirecting
        got = kv_stub(lc.client_addr(follower)).Range(kv_pb2.RangeRequest(key=b"k"), timeout=10)
        assert got.header.member_id == follower and got.kvs[0].value == b"v"
        # writes still go to the leader
        with pytest.raises(grpc.RpcError) as e:
            kv_stub(lc.client_addr(follower)).Put(kv_pb2.PutRequest(key=b"k", value=b"w"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "TESTING MODE" in open(lc.log_path(leader)).read()
    finally:
        lc.stop()
