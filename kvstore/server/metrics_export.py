"""What a node exports to Prometheus, named like etcd's metrics with a `kvstore_` prefix.

Etcd's runbooks and alerts translate by swapping the prefix:
`etcd_server_has_leader` is `kvstore_server_has_leader`, and so on (the
etcd_debugging_mvcc_* gauges are kvstore_mvcc_*). Everything is built when
Prometheus scrapes, from what the node holds and what it recorded
(metrics.py, grpc_metrics.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.storage.alarms import KNOWN as KNOWN_ALARMS

from .grpc_metrics import GRPC_STATS, GrpcStats
from .metrics import SLOW_APPLY_S, FastHistogram, NodeMetrics

if TYPE_CHECKING:
    from kvstore.storage.raft_log import RaftLog
    from kvstore.storage.state_machine import StateMachine

    from .node import Node


def _histogram(name: str, doc: str, hist: FastHistogram, labels: dict[str, str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    if family is None:
        family = HistogramMetricFamily(name, doc, labels=list(labels or ()))
    family.add_metric(list((labels or {}).values()), hist.cumulative(), hist.sum)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class NodeCollector(Collector):
    """Builds every kvstore_* metric from the node's state when Prometheus scrapes."""

    def __init__(self, node: Node, grpc_stats: GrpcStats = GRPC_STATS) -> None:
        self.node = node
        self.grpc = grpc_stats

    def collect(self) -> Iterator[Metric]:
        node = self.node
        sm, wal = node.sm, node.log
        if node.raw is None or sm is None or wal is None:  # still opening storage
            return
        m = node.metrics
        yield from self._server(node, sm, m)
        yield from self._disk(m)
        yield from self._network(node, m)
        yield from self._storage(node, sm, wal)
        yield from grpc_families(self.grpc)

    def _server(self, node: Node, sm: StateMachine, m: NodeMetrics) -> Iterable[Metric]:
        yield _gauge("kvstore_server_has_leader", "Whether a leader exists: 1 if it does, 0 if not.",
                     1 if node.leader_id else 0)
        yield _gauge("kvstore_server_is_leader", "Whether this member is the leader: 1 if it is, 0 if not.",
                     1 if node.is_leader else 0)
        yield _counter("kvstore_server_leader_changes_seen_total", "The number of leader changes seen.",
                       m.leader_changes)
        # Gauges, as etcd's: they follow the raft indexes, which a restart does not reset.
        yield _gauge("kvstore_server_proposals_committed_total",
                     "The total number of consensus proposals committed (the commit index).", node.commit_index)
        yield _gauge("kvstore_server_proposals_applied_total",
                     "The total number of consensus proposals applied (the applied index).", sm.applied_index)
        yield _gauge("kvstore_server_proposals_pending", "The current number of pending proposals to commit.",
                     len(node.proposals))
        yield _counter("kvstore_server_proposals_failed_total", "The total number of failed proposals seen.",
                       node.proposals.failed)
        yield _counter("kvstore_server_slow_apply_total",
                       f"The total number of apply batches that took longer than {SLOW_APPLY_S:g}s.",
                       m.slow_applies)
        dropped_heartbeats = sum(p.dropped_heartbeats for p in node.transport.peers.values()) \
            if node.transport else 0
        yield _counter("kvstore_server_heartbeat_send_failures_total",
                       "The total number of leader heartbeat send failures (likely overloaded from slow disk).",
                       dropped_heartbeats)
        yield _gauge("kvstore_server_leases", "The number of leases (granted, not yet revoked or expired).",
                     len(sm.leases))
        yield _counter("kvstore_server_lease_expired_total",
                       "The total number of leases this member revoked as their leader because they expired.",
                       node.lessor.revoked)
        yield _gauge("kvstore_server_quota_backend_bytes",
                     "Current backend storage quota size in bytes (--quota-backend-bytes).", node.space_quota.quota)
        alarms = GaugeMetricFamily("kvstore_server_alarms_active",
                                   "Members with this alarm raised (CORRUPT: their state differs from the others').",
                                   labels=["alarm"])
        active = sm.alarms
        for name in KNOWN_ALARMS:
            alarms.add_metric([name], sum(1 for _m, a in active if a == name))
        yield alarms
        yield _gauge("kvstore_server_id", "This member's id.", node.id)

    def _disk(self, m: NodeMetrics) -> Iterable[Metric]:
        yield _histogram("kvstore_disk_wal_fsync_duration_seconds",
                         "The latency distributions of WAL appends (one write and its fdatasync).", m.wal_fsync)
        yield _histogram("kvstore_disk_backend_commit_duration_seconds",
                         "The latency distributions of apply transactions committed to LMDB.", m.backend_commit)
        yield _histogram("kvstore_snap_save_total_duration_seconds",
                         "The total latency distributions of saving a snapshot.", m.snapshot_save)

    def _network(self, node: Node, m: NodeMetrics) -> Iterable[Metric]:
        peers = node.transport.peers if node.transport else {}
        sent = CounterMetricFamily("kvstore_network_peer_sent_bytes", "The total number of bytes sent to peers.",
                                   labels=["To"])
        failures = CounterMetricFamily("kvstore_network_peer_sent_failures",
                                       "The total number of messages that could not be sent to peers.",
                                       labels=["To"])
        active = GaugeMetricFamily("kvstore_network_active_peers", "Whether the connection to the peer is up.",
                                   labels=["Local", "Remote"])
        for pid, p in sorted(peers.items()):
            sent.add_metric([str(pid)], p.sent_bytes)
            failures.add_metric([str(pid)], p.dropped)
            active.add_metric([str(node.id), str(pid)], 1 if p.writer is not None else 0)
        received = CounterMetricFamily("kvstore_network_peer_received_bytes",
                                       "The total number of bytes received from peers.", labels=["From"])
        for pid in sorted(peers):
            received.add_metric([str(pid)], node.peer_received_bytes.get(pid, 0))
        yield sent
        yield received
        yield failures
        yield active
        rtt = HistogramMetricFamily("kvstore_network_peer_round_trip_time_seconds",
                                    "Round-trip-time histogram between peers (a leader's heartbeat and its answer).",
                                    labels=["To"])
        for pid in sorted(peers):
            _histogram("", "", m.rtt(pid), {"To": str(pid)}, family=rtt)
        yield rtt

    def _storage(self, node: Node, sm: StateMachine, wal: RaftLog) -> Iterable[Metric]:
        yield _gauge("kvstore_mvcc_db_total_size_in_bytes",
                     "Total size of the underlying database physically allocated in bytes.", sm.db_size())
        yield _gauge("kvstore_mvcc_keys_total", "Total number of keys.", sm.key_count())
        yield _gauge("kvstore_mvcc_current_revision", "The current revision of the store.", sm.revision)
        yield _gauge("kvstore_wal_size_in_bytes", "Bytes of WAL segment files on disk.", wal.wal_size())
        yield _gauge("kvstore_server_snapshot_index", "The log index of the newest snapshot.", node.snapshot_index)


def build_registry(node: Node) -> CollectorRegistry:
    """The node's metrics plus the standard process_* and python_* ones."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(NodeCollector(node))
    return registry


def grpc_families(stats: GrpcStats) -> Iterator[Metric]:
    """kvstore_grpc_server_* from the process's gRPC stats."""
    labels = ["grpc_type", "grpc_service", "grpc_method"]
    handled = CounterMetricFamily("kvstore_grpc_server_handled", "Total number of RPCs completed on the server, "
                                  "regardless of success or failure.", labels=labels + ["grpc_code"])
    handling = HistogramMetricFamily("kvstore_grpc_server_handling_seconds", "Histogram of response latency "
                                     "(seconds) of gRPC that had been application-level handled by the server.",
                                     labels=labels)
    for m in list(stats.methods.values()):
        base = [m.grpc_type, m.service, m.method]
        for code, n in list(m.codes.items()):
            handled.add_metric(base + [code], n)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(m.bounds + [float("inf")], list(m.counts), strict=True):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        handling.add_metric(base, buckets, m.sum)
    yield handled
    yield handling
    ops = CounterMetricFamily("kvstore_grpc_server_batch_ops", "Operations carried by Batch RPCs, one by one.",
                              labels=["kind"])
    for kind, n in stats.batch_ops.items():
        ops.add_metric([kind], n)
    yield ops
