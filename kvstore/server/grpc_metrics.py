"""gRPC server metrics, as go-grpc-prometheus names them (with the `kvstore_` prefix).

kvstore_grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code} and
kvstore_grpc_server_handling_seconds{...} histograms; a Batch's operations are
also counted one by one (kvstore_grpc_server_batch_ops_total{kind}), so
request rates compare with etcd's, where each op is its own RPC.

This is the one per-request cost of the metrics: the service handlers run on
the event loop, one at a time, so recording is a dict add and a bisect with
no lock (see metrics.FastHistogram). One process serves one node: the stats
are the process's. metrics_export.py exports them.
"""
from __future__ import annotations

from bisect import bisect_left


# go-grpc-prometheus's default buckets (prometheus.DefBuckets)
HANDLING_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_OP_KINDS = ("write", "read", "invalid")


class MethodStats:
    """One RPC method: calls by status code and their handling time. Event-loop thread only."""

    __slots__ = ("bounds", "codes", "counts", "grpc_type", "method", "service", "sum")

    def __init__(self, service: str, method: str, grpc_type: str = "unary") -> None:
        self.service = service
        self.method = method
        self.grpc_type = grpc_type
        self.codes: dict[str, int] = {"OK": 0}
        self.bounds = HANDLING_BUCKETS
        self.counts = [0] * (len(HANDLING_BUCKETS) + 1)
        self.sum = 0.0

    def record(self, code: str, seconds: float) -> None:
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        # Nearly every call is under 5 ms: check the first bucket before bisecting.
        if seconds <= 0.005:
            self.counts[0] += 1
        else:
            self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class GrpcStats:
    def __init__(self) -> None:
        self.methods: dict[tuple[str, str, str], MethodStats] = {}
        self.batch_ops = dict.fromkeys(BATCH_OP_KINDS, 0)

    def method(self, service: str, method: str, grpc_type: str = "unary") -> MethodStats:
        """A method's stats; grpc_type "session" for the calls carried by a Session stream."""
        key = (service, method, grpc_type)
        m = self.methods.get(key)
        if m is None:
            m = self.methods[key] = MethodStats(service, method, grpc_type)
        return m


GRPC_STATS = GrpcStats()
