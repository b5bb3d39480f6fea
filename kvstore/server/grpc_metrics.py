"""gRPC server metrics, as go-grpc-prometheus names them (with the `kvstore_` prefix).

kvstore_grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code} and
kvstore_grpc_server_handling_seconds{...} histograms; a Batch's operations are
also counted one by one (kvstore_grpc_server_batch_ops_total{kind}), so
request rates compare with etcd's, where each op is its own RPC.

This is the one per-request cost of the metrics: the service handlers run on
the event loop, one at a time, so recording is a dict add and a bisect with
no lock (see `FastHistogram`). One process serves one node: the stats are the
process's.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

# go-grpc-prometheus's default buckets (prometheus.DefBuckets)
HANDLING_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_OP_KINDS = ("write", "read", "invalid")


class MethodStats:
    """One RPC method: calls by status code and their handling time. Event-loop thread only."""

    __slots__ = ("bounds", "codes", "counts", "method", "service", "sum")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
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
        self.methods: dict[tuple[str, str], MethodStats] = {}
        self.batch_ops = dict.fromkeys(BATCH_OP_KINDS, 0)

    def method(self, service: str, method: str) -> MethodStats:
        key = (service, method)
        m = self.methods.get(key)
        if m is None:
            m = self.methods[key] = MethodStats(service, method)
        return m

    def collect(self) -> Iterator[Metric]:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        handled = CounterMetricFamily("kvstore_grpc_server_handled", "Total number of RPCs completed on the server, "
                                      "regardless of success or failure.", labels=labels + ["grpc_code"])
        handling = HistogramMetricFamily("kvstore_grpc_server_handling_seconds", "Histogram of response latency "
                                         "(seconds) of gRPC that had been application-level handled by the server.",
                                         labels=labels)
        for m in list(self.methods.values()):
            base = ["unary", m.service, m.method]
            for code, n in list(m.codes.items()):
                handled.add_metric(base + [code], n)
            buckets, total = [], 0
            for bound, n in zip(m.bounds + [float("inf")], list(m.counts), strict=True):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            handling.add_metric(base, buckets, m.sum)
        yield handled
        yield handling
        ops = CounterMetricFamily("kvstore_grpc_server_batch_ops", "Operations carried by Batch RPCs, one by one.",
                                  labels=["kind"])
        for kind, n in self.batch_ops.items():
            ops.add_metric([kind], n)
        yield ops


GRPC_STATS = GrpcStats()
