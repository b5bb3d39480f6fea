"""What a node records for its metrics, cheaply (metrics_export.py turns it into Prometheus's).

Cost on the hot path. Nothing here runs per request except the gRPC stats
(grpc_metrics.py). Values the node already holds (leader, indexes, pending
proposals, sizes) are read when Prometheus scrapes (metrics_export.py); the
node counts events into plain ints and times each WAL append, apply batch and
snapshot into a `FastHistogram`: a sorted list of bounds and a list of
counts, no lock, because each histogram has one writer at a time (the event
loop, or the one storage or apply thread the node has handed the work to).
A scrape only reads. Nothing here imports prometheus_client, so a node
started without --listen-metrics-addr never loads it.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


def exponential_buckets(start: float, factor: float, count: int) -> list[float]:
    return [start * factor ** i for i in range(count)]


# etcd's buckets: disk latencies 1 ms .. 8 s, peer RTT 0.1 ms .. 0.8 s.
DISK_BUCKETS = exponential_buckets(0.001, 2, 14)
RTT_BUCKETS = exponential_buckets(0.0001, 2, 14)
# An apply batch slower than this counts as slow (etcd warns "apply request took too long" past 100 ms).
SLOW_APPLY_S = 0.1


class FastHistogram:
    """A histogram for one writer at a time, read by scrapes: observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs in Prometheus order, ending with +Inf."""
        out: list[tuple[str, float]] = []
        total = 0
        counts = list(self.counts)  # a consistent copy: the writer may add meanwhile
        for bound, n in zip(self.bounds + [float("inf")], counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class NodeMetrics:
    """The node's event counts and timings (the values it holds anyway are read at scrape time)."""

    def __init__(self) -> None:
        self.leader_changes = 0
        self.slow_applies = 0
        self.wal_fsync = FastHistogram(DISK_BUCKETS)  # one RaftLog.append: the write and its fdatasync
        self.backend_commit = FastHistogram(DISK_BUCKETS)  # one apply batch: its LMDB transaction
        self.snapshot_save = FastHistogram(DISK_BUCKETS)
        self.peer_rtt: dict[int, FastHistogram] = {}

    def rtt(self, peer_id: int) -> FastHistogram:
        h = self.peer_rtt.get(peer_id)
        if h is None:
            h = self.peer_rtt[peer_id] = FastHistogram(RTT_BUCKETS)
        return h
