"""Which cluster a data dir belongs to: `<data-dir>/cluster.json` {cluster_id, member_id}.

Written when a data dir is made for a cluster that has its own id (a restore
from a backup gives the new cluster a new id). A member started on such a
dir takes its cluster id from it, and refuses to start with a --cluster-id or
--id that says otherwise: a data dir never joins a cluster it was not made for.
The id is derived, as etcd derives its cluster id, from the initial member
list and --initial-cluster-token, so every member restored with the same
flags computes the same id without talking to the others.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

from .durable_files import fsync_dir, fsync_file

FILE_NAME = "cluster.json"


class ClusterIdentityError(Exception):
    """The data dir belongs to another cluster or member than the flags say."""


@dataclass(frozen=True)
class ClusterIdentity:
    cluster_id: int
    member_id: int


def derive_cluster_id(members: dict[int, str], token: str) -> int:
    """A 63-bit id from the sorted member list and the token (never 0: 0 means 'no id')."""
    text = token + "|" + ",".join(f"{i}={members[i]}" for i in sorted(members))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1 or 1


def read(data_dir: str) -> ClusterIdentity | None:
    path = os.path.join(data_dir, FILE_NAME)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterIdentityError(f"{path}: unreadable ({e})") from None
    return ClusterIdentity(int(doc["cluster_id"]), int(doc["member_id"]))


def write(data_dir: str, ident: ClusterIdentity) -> None:
    """Durably write the identity file (temporary file, fsync, rename, fsync the directory)."""
    fd, tmp = tempfile.mkstemp(prefix=".cluster-", dir=data_dir)
    with os.fdopen(fd, "w") as f:
        json.dump({"cluster_id": ident.cluster_id, "member_id": ident.member_id}, f)
        f.flush()
        fsync_file(f.fileno(), tmp)
    os.rename(tmp, os.path.join(data_dir, FILE_NAME))
    fsync_dir(data_dir)


def check(data_dir: str, cluster_id: int, member_id: int) -> int:
    """The cluster id to run with: the data dir's if it has one, else `cluster_id` (the flag).

    ClusterIdentityError when the flags contradict the data dir.
    """
    ident = read(data_dir)
    if ident is None:
        return cluster_id
    if cluster_id and cluster_id != ident.cluster_id:
        raise ClusterIdentityError(
            f"data dir {data_dir} belongs to cluster {ident.cluster_id}, not --cluster-id {cluster_id}")
    if member_id != ident.member_id:
        raise ClusterIdentityError(f"data dir {data_dir} belongs to member {ident.member_id}, not --id {member_id}")
    return ident.cluster_id
