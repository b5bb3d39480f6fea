"""Whether a member is healthy, as etcd's /health, /livez and /readyz judge it.

Healthy (/health, /readyz) means: the member knows a leader (a member cut off
from a quorum loses it within an election timeout: pre-vote and check-quorum
clear it), no alarm is raised in the cluster (etcd reports any alarm), its
WAL writes are not stuck (a failed fsync stops the process outright; one that
hangs shows here), and it is not shutting down. Live (/livez) means the
process's event loop answers at all.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node

# A WAL append (write + fdatasync) under way for longer than this makes the member unhealthy;
# etcd warns of a "slow fdatasync" past 1 s, and a loaded machine sees a few of those.
WAL_STUCK_S = 5.0


def problems(node: Node) -> list[str]:
    """Why the member is not healthy, in etcd's words; empty when it is."""
    out = []
    if node.draining:
        out.append("SHUTTING DOWN")
    if not node.leader_id:
        out.append("RAFT NO LEADER")
    if node.sm is not None:
        for name in sorted({a for _m, a in node.sm.alarms}):
            out.append(f"ALARM {name}")
    since = node.wal_append_since
    if since and time.monotonic() - since > WAL_STUCK_S:
        out.append(f"WAL FSYNC STUCK FOR {time.monotonic() - since:.1f}s")
    return out
