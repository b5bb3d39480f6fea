"""TLS settings of a client: which CA to trust, and the client's own certificate.

    Client(["https://10.0.0.1:2379"], tls=TLS(ca="ca.crt", cert="client.crt", key="client.key"))

The files are read whenever a channel is created, so a client made after a
rotation uses the new files. `ca=None` trusts the system's root CAs; `cert`
and `key` are needed when the members run with --client-cert-auth.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

__all__ = ["TLS"]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the TLS {what} file {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class TLS:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a TLS client certificate needs both cert and key")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the files as they are now (ValueError names a file that cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca else None,
            private_key=_read(self.key, "key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None,
        )
