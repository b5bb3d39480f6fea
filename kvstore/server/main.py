"""The node process: `python -m kvstore.server.main [flags]` (also `kvstore serve`).

Starts the node, the peer API and the client API, and stops them in the
order that loses nothing on SIGTERM/SIGINT: hand over leadership (the peer
API must still be up for that), stop taking client requests while the
in-flight ones finish, then stop raft and close storage.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import grpc

from kvstore.storage import cluster_identity
from kvstore.storage.data_dir_lock import DataDirInUse, lock_data_dir
from kvstore.storage import permissions
from kvstore.storage.members import MemberSet
from kvstore.v1 import auth_pb2_grpc, cluster_pb2_grpc, kv_pb2_grpc, lease_pb2_grpc, maintenance_pb2_grpc

from .auth_guard import AuthGuard, lease_checked, root_only
from .auth_service import AuthService

from .auto_compaction import AutoCompactor
from .cluster_service import ClusterService
from .config import ServerConfig, parse_args, parse_duration
from .corruption import CorruptionChecker
from .join import JoinError, ask_members
from .kv_service import KVService
from .lease_service import LeaseService
from .lessor import min_lease_ttl
from .limits import Limits
from .logs import log_term_from, setup_logging
from .loop_watchdog import watch_loop
from .maintenance_service import MaintenanceService
from .node import Node
from .parent_death import die_with_parent
from .peer_server import PeerServer
from .tls import TLSConfigError, client_api_credentials, peer_tls
from .watch_service import WatchService, add_watch_service

log = logging.getLogger("kvstore.server")


#: The client library keeps a session stream open while idle and pings every 10 s
#: (DEFAULT_CHANNEL_OPTIONS); gRPC's default server policy allows one ping per 5
#: minutes without data and answers more with GOAWAY "too_many_pings", which would
#: cut every idle stream (and its connection) after about a minute.
KEEPALIVE_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def client_server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    # gRPC's own cap sits well above --max-request-bytes so that our check,
    # which names the flag, is the one a slightly oversized request meets.
    cap = 4 * cfg.max_request_bytes + (1 << 20)
    return [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", 64 << 20),
            *KEEPALIVE_SERVER_OPTIONS]


async def serve(cfg: ServerConfig, join_members: MemberSet | None = None) -> None:
    try:
        client_tls = client_api_credentials(cfg)
        node = Node(cfg, peer_tls=peer_tls(cfg), join_members=join_members)
    except TLSConfigError as e:
        log.critical("cannot start: %s", e)
        raise SystemExit(1) from None
    log_term_from(lambda: node.term)
    await node.start()
    watchdog = asyncio.create_task(watch_loop())  # from here on, a blocked loop is reported

    peer_server = PeerServer(node, tls=node.peer_tls)
    host, _, port = cfg.listen_peer_addr.rpartition(":")
    try:
        await peer_server.start(host.strip("[]"), int(port))
    except OSError as e:
        await cannot_listen(node, "peer", cfg.listen_peer_addr, e.strerror or str(e))
    client_server = grpc.aio.server(options=client_server_options(cfg))
    guard = AuthGuard(node)
    permissions.testing_skip_txn_ops = cfg.testing_auth_skip_txn_check
    kv_pb2_grpc.add_KVServicer_to_server(KVService(node, Limits.from_config(cfg), guard), client_server)
    cluster_pb2_grpc.add_ClusterServicer_to_server(root_only(ClusterService(node), guard), client_server)
    maintenance_pb2_grpc.add_MaintenanceServicer_to_server(root_only(MaintenanceService(node), guard), client_server)
    auth_pb2_grpc.add_AuthServicer_to_server(AuthService(node, guard, cfg.auth_token_ttl), client_server)
    add_watch_service(WatchService(node, parse_duration(cfg.watch_progress_notify_interval), guard), client_server)
    lease_pb2_grpc.add_LeaseServicer_to_server(lease_checked(
        LeaseService(node, node.lessor, min_lease_ttl(cfg.tick_ms, cfg.election_ticks)), guard), client_server)
    try:
        if client_tls is None:
            bound = client_server.add_insecure_port(cfg.listen_client_addr)
        else:
            bound = client_server.add_secure_port(cfg.listen_client_addr, client_tls.server_credentials())
    except RuntimeError:
        bound = 0
    if bound == 0:
        await peer_server.stop()
        await cannot_listen(node, "client", cfg.listen_client_addr, "in use?")
    await client_server.start()
    http = None
    if cfg.listen_metrics_addr:
        from .http_endpoints import HttpEndpoints  # prometheus_client: loaded only when served

        http = HttpEndpoints(node)
        host, _, port = cfg.listen_metrics_addr.rpartition(":")
        try:
            await http.start(host.strip("[]"), int(port))
        except OSError as e:
            await client_server.stop(None)
            await peer_server.stop()
            await cannot_listen(node, "metrics", cfg.listen_metrics_addr, e.strerror or str(e))
        log.info("member %d serving /metrics and /health on http://%s", cfg.id, cfg.listen_metrics_addr)
    compactor = AutoCompactor(node, cfg.auto_compaction_mode, cfg.auto_compaction_retention,
                              cfg.auto_compaction_interval)
    compactor.start()
    checker = CorruptionChecker(node, cfg.corrupt_check_s)
    if cfg.corrupt_check_s > 0:
        checker.start()
    log.info("member %d serving clients on %s://%s, peers on %s://%s, data in %s",
             cfg.id, "http" if client_tls is None else "https", cfg.listen_client_addr,
             "http" if node.peer_tls is None else "https", cfg.listen_peer_addr, cfg.data_dir)
    if cfg.testing_peer_skip_client_verify:
        log.warning("TESTING MODE: the peer API does not check peer certificates (unsafe flag set)")
    if cfg.testing_unsafe_local_reads or cfg.testing_ack_before_commit or cfg.testing_corrupt_state:
        log.warning("TESTING MODE: linearizability is deliberately broken (unsafe flags set)")
    if cfg.testing_auth_skip_txn_check:
        log.warning("TESTING MODE: ops inside a txn are not checked against permissions (unsafe flag set)")
    if cfg.testing_wall_clock_sessions:
        log.warning("TESTING MODE: session expiry follows the leader's wall clock (unsafe flag set)")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("member %d shutting down", cfg.id)
    watchdog.cancel()
    await node.shutdown()
    await checker.stop()
    await compactor.stop()
    await client_server.stop(grace=2.0)
    if http is not None:
        await http.stop()
    await peer_server.stop()
    await node.close()


async def cannot_listen(node: Node, what: str, addr: str, why: str) -> None:
    log.critical("cannot listen for %s connections on %s (%s)", what, addr, why)
    await node.close()
    raise SystemExit(1)


def run(cfg: ServerConfig) -> None:
    die_with_parent()
    setup_logging(cfg.log_format, cfg.log_level, cfg.name, cfg.id)
    try:
        lock_data_dir(cfg.data_dir)  # held until the process exits
    except DataDirInUse as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot lock data dir {cfg.data_dir}: {e.strerror or e}")
    try:  # a data dir made for a cluster of its own (a restore) carries that cluster's id
        cfg.cluster_id = cluster_identity.check(cfg.data_dir, cfg.cluster_id, cfg.id)
    except cluster_identity.ClusterIdentityError as e:
        sys.exit(f"error: {e}")
    join_members = None
    if cfg.initial_cluster_state == "existing" and not os.path.isdir(os.path.join(cfg.data_dir, "db")):
        try:
            join_members, cluster_id = ask_members(cfg)
        except JoinError as e:
            sys.exit(f"error: cannot join: {e}")
        if cfg.cluster_id and cluster_id != cfg.cluster_id:
            sys.exit(f"error: cannot join: the cluster at --initial-cluster-clients is cluster {cluster_id}, "
                     f"not --cluster-id {cfg.cluster_id}")
        cfg.cluster_id = cluster_id
        cluster_identity.write(cfg.data_dir, cluster_identity.ClusterIdentity(cluster_id, cfg.id))
        log.info("joining cluster %d as member %d: members %s, learners %s", cluster_id, cfg.id,
                 list(join_members.voters), list(join_members.learners))
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg, join_members))
    else:
        uvloop.run(serve(cfg, join_members))


def main(argv: list[str] | None = None, prog: str = "python -m kvstore.server.main") -> None:
    run(parse_args(argv, prog=prog))


if __name__ == "__main__":
    main()
