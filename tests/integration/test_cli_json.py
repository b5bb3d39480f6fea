"""`-w json` / `--write-out json` for get, range, status and members, against a real cluster."""
from __future__ import annotations

import base64
import json

import pytest
from click.testing import CliRunner

from kvstore.cli import main


@pytest.fixture(scope="module")
def run(cluster):
    cluster.wait_for_leader(60)
    endpoints = ",".join(cluster.endpoints)

    def run(*args: str, code: int = 0):
        r = CliRunner().invoke(main, ["--endpoints", endpoints, "--timeout", "20", *args])
        assert r.exit_code == code, r.output
        return json.loads(r.output) if "json" in args else r.output

    run("put", "j/a", "1")
    run("put", "j/b", "two")
    return run


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_get(run):
    doc = run("get", "j/b", "-w", "json")
    (kv,) = doc["kvs"]
    assert (kv["key"], kv["value"], kv["version"], doc["count"]) == (b64("j/b"), b64("two"), 1, 1)
    assert kv["mod_revision"] == kv["create_revision"] <= doc["header"]["revision"]
    missing = run("get", "j/none", "--write-out", "json")
    assert (missing["kvs"], missing["count"]) == ([], 0)
    run("get", "j/none", code=1)  # the simple format still exits 1 for a missing key
    prefixed = run("get", "j/", "--prefix", "-w", "json")
    assert [kv["key"] for kv in prefixed["kvs"]] == [b64("j/a"), b64("j/b")]


def test_range(run):
    doc = run("range", "j/", "--prefix", "--limit", "1", "-w", "json")
    assert ([kv["key"] for kv in doc["kvs"]], doc["count"], doc["more"]) == ([b64("j/a")], 2, True)
    keys = run("range", "j/a", "j/c", "--keys-only", "-w", "json")
    assert [sorted(kv) for kv in keys["kvs"]] == [["create_revision", "key", "mod_revision", "version"]] * 2


def test_status(run, cluster):
    doc = run("status", "-w", "json")
    assert sorted(e["Endpoint"] for e in doc) == sorted(cluster.endpoints)
    st = {e["Status"]["header"]["member_id"]: e["Status"] for e in doc}
    assert sorted(st) == cluster.ids
    assert [m for m, s in st.items() if s["role"] == "leader"] == [st[1]["leader"]]
    assert all(s["raftTerm"] >= 1 and s["raftAppliedIndex"] >= 1 and s["dbSize"] > 0 for s in st.values())


def test_members(run, cluster):
    doc = run("members", "-w", "json")
    assert [(m["ID"], m["clientURLs"], m["peerURLs"]) for m in doc["members"]] == [
        (i, [cluster.client_addr(i)], [cluster.peer_addr(i)]) for i in cluster.ids]
