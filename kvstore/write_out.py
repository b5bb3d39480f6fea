"""`-w json` / `--write-out json`: the CLI's answers as JSON documents, shaped like etcdctl's.

Scripts written against `etcdctl -w json` read these with few changes: the
same field names (protobuf JSON names), keys and values base64-encoded (they
are bytes), a "header" with the revision the answer reflects. One document
per command, on one line.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module at start; the client only when a command runs
    from kvstore.client.types import KeyValue, Member, MemberStatus

__all__ = ["FORMATS", "kvs_doc", "status_doc", "members_doc", "dumps"]

FORMATS = ("simple", "json")

JsonDoc = dict[str, Any]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _kv(kv: KeyValue, keys_only: bool) -> JsonDoc:
    doc: JsonDoc = {"key": _b64(kv.key), "create_revision": kv.create_revision,
                    "mod_revision": kv.mod_revision, "version": kv.version}
    if not keys_only:
        doc["value"] = _b64(kv.value)
    if kv.lease:
        doc["lease"] = kv.lease
    return doc


def kvs_doc(revision: int, kvs: Iterable[KeyValue], *, count: int | None = None, more: bool = False,
            keys_only: bool = False) -> JsonDoc:
    """A get or range answer: {"header": {"revision"}, "kvs": [...], "count", "more"}."""
    items = [_kv(kv, keys_only) for kv in kvs]
    return {"header": {"revision": revision}, "kvs": items,
            "count": len(items) if count is None else count, "more": more}


def status_doc(statuses: Mapping[str, MemberStatus | Exception]) -> list[JsonDoc]:
    """One entry per endpoint, as `etcdctl endpoint status -w json`; a member that failed has "Error"."""
    out: list[JsonDoc] = []
    for ep, st in sorted(statuses.items()):
        if isinstance(st, Exception):
            out.append({"Endpoint": ep, "Error": f"{type(st).__name__}: {st}"})
            continue
        out.append({"Endpoint": ep, "Status": {
            "header": {"member_id": st.member_id, "revision": st.revision, "raft_term": st.term},
            "version": st.version, "role": st.role, "leader": st.leader_id,
            "raftTerm": st.term, "raftIndex": st.commit_index, "raftAppliedIndex": st.applied_index,
            "snapshotIndex": st.snapshot_index, "dbSize": st.db_size, "walSize": st.wal_size,
        }})
    return out


def members_doc(members: Iterable[Member]) -> JsonDoc:
    """{"members": [{"ID", "name", "peerURLs", "clientURLs"}]}, as `etcdctl member list -w json`."""
    out: list[JsonDoc] = []
    for m in members:
        doc: JsonDoc = {"ID": m.id, "name": m.name, "peerURLs": list(m.peer_urls), "clientURLs": list(m.client_urls)}
        if m.is_learner:
            doc["isLearner"] = True
        out.append(doc)
    return {"members": out}


def dumps(doc: JsonDoc | list[JsonDoc]) -> str:
    return json.dumps(doc, separators=(",", ":"))
