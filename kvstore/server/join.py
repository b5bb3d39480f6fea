"""Joining a running cluster (`--initial-cluster-state existing`): ask it for its member list.

A member added with `kvstore member add` starts on an empty data dir. It must
not guess the membership from its flags: were it a learner that believed it
votes, it could campaign. So, like etcd, it asks the members it was given
(--initial-cluster-clients) for their member list and starts with that, after
checking it is in it. The answer's cluster id becomes this member's.
"""
from __future__ import annotations

import logging
import time

import grpc

from kvstore.storage.members import MemberInfo, MemberSet
from kvstore.v1 import cluster_pb2, cluster_pb2_grpc

from .config import ServerConfig, split_scheme

log = logging.getLogger("kvstore.server")


class JoinError(Exception):
    """The cluster could not be asked, or does not list this member."""


def _credentials(cfg: ServerConfig) -> grpc.ChannelCredentials | None:
    if not cfg.cert_file:
        return None

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(cfg.trusted_ca_file), read(cfg.key_file), read(cfg.cert_file))


def ask_members(cfg: ServerConfig, timeout_s: float = 60.0) -> tuple[MemberSet, int]:
    """(the member set, the cluster id) as a running member reports them; JoinError if none answers."""
    addrs = [a for i, a in sorted(cfg.clients.items()) if i != cfg.id]
    if not addrs:
        raise JoinError("--initial-cluster-state existing needs the other members in --initial-cluster-clients")
    creds = _credentials(cfg)
    deadline = time.monotonic() + timeout_s
    errors: dict[str, str] = {}
    while time.monotonic() < deadline:
        for addr in addrs:
            channel = grpc.insecure_channel(addr) if creds is None else grpc.secure_channel(addr, creds)
            try:
                resp = cluster_pb2_grpc.ClusterStub(channel).MemberList(cluster_pb2.MemberListRequest(), timeout=2.0)
            except grpc.RpcError as e:
                errors[addr] = f"{e.code().name}: {e.details()}"
                continue
            finally:
                channel.close()
            return _member_set(cfg, resp), resp.header.cluster_id
        time.sleep(0.5)
    raise JoinError("no member answered MemberList: " + "; ".join(f"{a}: {e}" for a, e in errors.items()))


def _member_set(cfg: ServerConfig, resp: cluster_pb2.MemberListResponse) -> MemberSet:
    ids = [m.id for m in resp.members]
    if cfg.id not in ids:
        raise JoinError(f"member {cfg.id} is not in the cluster's member list {sorted(ids)}: add it with "
                        f"`kvstore member add` first, and start it with the id that gives")
    info = {m.id: MemberInfo(m.name, tuple(split_scheme(u)[1] for u in m.peer_urls),
                             tuple(split_scheme(u)[1] for u in m.client_urls)) for m in resp.members}
    return MemberSet(voters=tuple(sorted(m.id for m in resp.members if not m.is_learner)),
                     learners=tuple(sorted(m.id for m in resp.members if m.is_learner)), info=info)
