"""`kvstore snapshot save|status|restore`: backups, as etcdctl/etcdutl's.

    kvstore snapshot save backup.db                 # a consistent image from a member, checksum verified
    kvstore snapshot status backup.db               # revision, keys, size, hash
    kvstore snapshot restore backup.db --data-dir data/node1 --id 1 \\
        --initial-cluster 1=127.0.0.1:2380,2=127.0.0.1:2480,3=127.0.0.1:2580

Restore the same file with the same --initial-cluster (and token) on every
member, then start each with `kvstore serve --data-dir DIR --id N
--initial-cluster ...`: a new cluster (new cluster id) with the backup's data.
"""
from __future__ import annotations

import json

import click

from kvstore.cli import client_tls, console, fail


@click.group()
def snapshot() -> None:
    """Back up a cluster, inspect a backup, restore one into a new member data dir."""


@snapshot.command("save")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def snapshot_save(ctx: click.Context, file: str) -> None:
    """Stream a consistent image from a member into FILE (the first of --endpoints that answers)."""
    from kvstore.client.snapshot_save import SnapshotStreamError, save_snapshot
    from kvstore.storage.backup import BackupError

    errors = []
    for ep in ctx.obj["endpoints"]:
        try:
            info = save_snapshot(ep, file, tls=client_tls(ctx), timeout=max(ctx.obj["timeout"], 60.0))
        except (SnapshotStreamError, BackupError) as e:
            errors.append(str(e))
            continue
        except OSError as e:
            fail(f"cannot write {file}: {e.strerror or e}")
        console.print(f"Snapshot saved at {file} from {ep}: revision {info.revision}, index {info.index}, "
                      f"{info.keys} keys, {info.size} bytes, sha256 {info.sha256}", highlight=False)
        return
    fail("no member sent a whole snapshot: " + "; ".join(errors))


@snapshot.command("status")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-w", "--write-out", type=click.Choice(["simple", "json"]), default="simple", show_default=True)
def snapshot_status(file: str, write_out: str) -> None:
    """Check FILE's checksum and print its revision, key count, size and hash."""
    from kvstore.storage.backup import BackupError, verify

    try:
        info = verify(file)
    except BackupError as e:
        fail(str(e))
    if write_out == "json":
        click.echo(json.dumps({"hash": info.hash, "revision": info.revision, "totalKey": info.keys,
                               "totalSize": info.size, "index": info.index, "term": info.term,
                               "sha256": info.sha256}))
        return
    console.print("hash\trevision\ttotal keys\ttotal size\tindex\tterm", highlight=False)
    console.print(f"{info.hash:08x}\t{info.revision}\t{info.keys}\t{info.size}\t{info.index}\t{info.term}",
                  highlight=False)


@snapshot.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--data-dir", required=True, help="the new member's data dir (must not exist, or be empty)")
@click.option("--id", "member_id", type=int, required=True, help="this member's id, a key of --initial-cluster")
@click.option("--name", default="", help="a human-readable member name (not stored; give it to `serve --name`)")
@click.option("--initial-cluster", required=True, help="the new cluster's members: 'ID=HOST:PORT,...'")
@click.option("--initial-cluster-clients", default="",
              help="the new cluster's client addresses: 'ID=HOST:PORT,...' (as given to `serve`)")
@click.option("--initial-cluster-token", default="kvstore-cluster", show_default=True,
              help="mixed into the new cluster id: restore each cluster from a backup with a token of its own")
def snapshot_restore(file: str, data_dir: str, member_id: int, name: str, initial_cluster: str,
                     initial_cluster_clients: str, initial_cluster_token: str) -> None:
    """Write a fresh data dir for one member of a new cluster holding FILE's data."""
    from kvstore.server.config import parse_members
    from kvstore.storage.backup import BackupError
    from kvstore.storage.restore import RestoreError, restore

    try:
        members = parse_members(initial_cluster)
    except ValueError as e:
        fail(f"--initial-cluster: {e}")
    try:
        clients = parse_members(initial_cluster_clients)
    except ValueError as e:
        fail(f"--initial-cluster-clients: {e}")
    if clients and set(clients) != set(members):
        fail("--initial-cluster and --initial-cluster-clients must name the same members")
    try:
        info, cluster_id = restore(file, data_dir, member_id, members, initial_cluster_token, clients)
    except (BackupError, RestoreError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"restore into {data_dir} failed: {e.strerror or e}")
    console.print(f"restored {file} (revision {info.revision}, index {info.index}, {info.keys} keys) into "
                  f"{data_dir}: member {member_id}{f' ({name})' if name else ''} of new cluster {cluster_id}",
                  highlight=False)
