"""Make a fresh member data dir from a backup file (`kvstore snapshot restore`, like `etcdutl snapshot restore`).

The new data dir holds:
  db/           the backup's image installed as the state machine (applied index N, term T),
                its member set replaced by the new one
  wal/          an empty log whose base is (N, T) with the new member list as its
                configuration, and a hard state at term T, commit N
  cluster.json  the new cluster's id (derived from the member list and the token) and this member's id

Restoring the same file with the same --initial-cluster and token on every
member gives a new cluster that starts from the backup's data: all members
agree on the log's base, so the first leader only appends after it.

Everything is built in a temporary directory next to the target and renamed
into place at the end: a bad backup, a crash or an error leaves nothing at
the target.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from kvstore.raft.types import ConfState, HardState, SnapshotMetadata

from . import cluster_identity
from .backup import BackupInfo, copy_image, verify
from .durable_files import fsync_dir
from .members import MemberSet
from .raft_log import RaftLog
from .state_machine import StateMachine


class RestoreError(Exception):
    """The target cannot be written (it exists, the member is not in the list...)."""


def restore(backup: str, data_dir: str, member_id: int, members: dict[int, str], token: str,
            clients: dict[int, str] | None = None) -> tuple[BackupInfo, int]:
    """Write a fresh data dir for `member_id` of `members` (peer addresses; `clients`: their client
    addresses) from `backup`; (the backup's info, the new cluster id).

    BackupError if the backup is unusable, RestoreError if the target is; nothing is written then.
    """
    if member_id not in members:
        raise RestoreError(f"member {member_id} is not in --initial-cluster ({', '.join(map(str, sorted(members)))})")
    info = verify(backup)
    target = os.path.abspath(data_dir)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise RestoreError(f"data dir {data_dir} already exists and is not empty; restore writes a fresh one")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".restore-", dir=parent)
    try:
        image = os.path.join(tmp, "backup.mdb")
        copy_image(backup, image)
        sm = StateMachine.open(os.path.join(tmp, "db"), fsync=True)
        try:
            sm.install_snapshot(image)
            # the new cluster's members, not the backed-up cluster's
            sm.set_members(MemberSet.initial(members, clients or {}), only_if_unset=False)
        finally:
            sm.close()
        os.unlink(image)  # install_snapshot linked it into the state machine
        meta = SnapshotMetadata(index=info.index, term=info.term, conf_state=ConfState(voters=sorted(members)))
        with RaftLog.open(os.path.join(tmp, "wal")) as log:
            log.apply_snapshot(meta)
            log.append([], HardState(term=info.term, vote=0, commit=info.index))
        cluster_id = cluster_identity.derive_cluster_id(members, token)
        cluster_identity.write(tmp, cluster_identity.ClusterIdentity(cluster_id, member_id))
        fsync_dir(tmp)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked above)
        os.rename(tmp, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info, cluster_id
