"""Save a backup from one member: stream its state machine image (Maintenance.Snapshot) into a file.

    from kvstore.client.snapshot_save import save_snapshot
    info = save_snapshot("127.0.0.1:2379", "backup.db")

The file is written by kvstore.storage.backup: a temporary file, checked
against the size and SHA-256 the member announced at the end of the stream,
then renamed. A broken stream or a mismatch leaves nothing at the path.
"""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from kvstore.storage.backup import BackupInfo, write_backup
from kvstore.v1 import maintenance_pb2, maintenance_pb2_grpc

from .endpoints import DEFAULT_CHANNEL_OPTIONS, normalize
from .tls import TLS


class SnapshotStreamError(Exception):
    """The member did not send a whole image (the stream broke or was refused)."""


def save_snapshot(endpoint: str, path: str, *, tls: TLS | None = None, timeout: float = 300.0) -> BackupInfo:
    """Stream `endpoint`'s image into a backup file at `path`; its BackupInfo once verified."""
    addr = normalize(endpoint)
    if tls is None and endpoint.strip().startswith("https://"):
        tls = TLS()
    options = list(DEFAULT_CHANNEL_OPTIONS)
    channel = (grpc.insecure_channel(addr, options=options) if tls is None
               else grpc.secure_channel(addr, tls.credentials(), options=options))
    end: list[maintenance_pb2.SnapshotResponse] = []

    def chunks(responses) -> Iterator[bytes]:
        try:
            first = next(responses, None)
            if first is None or first.blob or first.done:
                raise SnapshotStreamError(f"{addr}: the stream did not start with the image's position")
            for r in responses:
                if r.done:
                    end.append(r)
                    return
                yield r.blob
        except grpc.RpcError as e:
            raise SnapshotStreamError(f"{addr}: {e.code().name}: {e.details()}") from None
        raise SnapshotStreamError(f"{addr}: the stream ended before the image was complete")

    with channel:
        stub = maintenance_pb2_grpc.MaintenanceStub(channel)
        responses = stub.Snapshot(maintenance_pb2.SnapshotRequest(), timeout=timeout)
        return write_backup(path, chunks(responses), expected=lambda: (end[0].size, end[0].sha256))
