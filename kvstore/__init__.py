"""kvstore: a replicated key-value store whose nodes agree through Raft."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy ``from kvstore import Client, AsyncClient, TLS``: importing kvstore.raft must not load gRPC."""
    if name in ("Client", "AsyncClient", "TLS"):
        from kvstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
