"""The kvstore client library: ``Client`` (blocking, thread-safe) and ``AsyncClient`` (asyncio).

    from kvstore import Client
    with Client(["127.0.0.1:2379"]) as kv:
        kv.put("k", "v")
"""
from kvstore.client.async_client import AsyncClient
from kvstore.client.balancer import LeastOutstanding, RandomChoice, RoundRobin, Weighted
from kvstore.client.errors import (
    Compacted,
    DeadlineExceeded,
    FutureRevision,
    InvalidArgument,
    KvstoreError,
    LeaseLost,
    NoEndpointAnswered,
    NoLeader,
    NotFound,
    NotLeader,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from kvstore.client.lease import LeaseGrant, LeaseTimeToLive
from kvstore.client.retry import ExponentialBackoff, FixedInterval, NoRetry, RetryPolicy
from kvstore.client.sync_client import Client
from kvstore.client.tls import TLS
from kvstore.client.txn import Txn
from kvstore.client.watch import WatchCanceled, WatchCompacted, WatchEvent
from kvstore.client.types import (
    DeleteResult,
    GetResult,
    KeyValue,
    Member,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
)

__all__ = [
    "Client",
    "AsyncClient",
    "Txn",
    "TLS",
    "RetryPolicy",
    "FixedInterval",
    "ExponentialBackoff",
    "NoRetry",
    "RoundRobin",
    "RandomChoice",
    "LeastOutstanding",
    "Weighted",
    "KvstoreError",
    "Compacted",
    "FutureRevision",
    "WatchEvent",
    "WatchCanceled",
    "WatchCompacted",
    "Unavailable",
    "NotLeader",
    "NoLeader",
    "NoEndpointAnswered",
    "DeadlineExceeded",
    "InvalidArgument",
    "Unauthenticated",
    "PermissionDenied",
    "NotFound",
    "LeaseLost",
    "LeaseGrant",
    "LeaseTimeToLive",
    "KeyValue",
    "PutResult",
    "GetResult",
    "RangeResult",
    "DeleteResult",
    "TxnResult",
    "Member",
    "MemberStatus",
]
