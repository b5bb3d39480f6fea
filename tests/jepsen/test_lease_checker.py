"""The lease checker on hand-made histories: each rule catches what it names, and a clean run passes."""
from __future__ import annotations

from kvstore.jepsen.history import Operation
from kvstore.jepsen.lease_workload import check_leases

S = 1_000_000_000


class History:
    def __init__(self) -> None:
        self.ops: list[Operation] = []

    def op(self, f: str, key, output, start: float, end: float | None, outcome: str = "ok", value=None):
        self.ops.append(Operation(len(self.ops), 0, f, key, value, output, outcome, int(start * S),
                                  None if end is None else int(end * S)))
        return self

    def lease(self, key, granted_at: float, ttl: int = 2):
        return self.op("grant", key, {"lease": 100 + key, "ttl": ttl}, granted_at, granted_at + 0.01)

    def final(self, left=()):
        return self.op("final", None, list(left), 100, 101)


def test_a_lease_kept_alive_then_gone_after_its_ttl_is_valid():
    h = History().lease(1, 0).op("keepalive", 1, 2, 0.6, 0.61).op("read", 1, True, 2.5, 2.51)
    h.op("read", 1, False, 2.7, 2.71).final()
    v = check_leases(h.ops, 0.5, [])
    assert v.valid, v.summary
    assert v.details["gone_after_last_keepalive_s"]["min"] == 2.11


def test_gone_before_the_ttl_after_the_last_keep_alive_is_early():
    h = History().lease(1, 0).op("keepalive", 1, 2, 1.0, 1.01).op("read", 1, False, 2.5, 2.6).final()
    v = check_leases(h.ops, 0.5, [])
    assert not v.valid and "gone before their TTL" in v.summary
    assert v.details["early"][0]["gone_s_before_ttl"] == 0.4


def test_a_keep_alive_answered_no_such_lease_early_counts_as_gone():
    h = History().lease(1, 0).op("keepalive", 1, 2, 1.0, 1.01).op("keepalive", 1, 0, 1.5, 1.51).final()
    assert "gone before their TTL" in check_leases(h.ops, 0.5, []).summary


def test_present_after_it_was_due_is_late_unless_a_new_leader_restarted_its_clock():
    h = History().lease(1, 0).op("read", 1, True, 3.0, 3.01).op("read", 1, False, 3.2, 3.3).final()
    v = check_leases(h.ops, 0.5, [])
    assert not v.valid and "after it was due" in v.summary
    assert check_leases(h.ops, 0.5, [int(1.0 * S)]).valid  # a leader elected at 1.0 s: due at 3.5 s
    assert check_leases(h.ops, 0.5, [int(3.5 * S)]).valid  # seen up to a second after the read


def test_a_keep_alive_that_renews_a_lease_already_gone_is_caught():
    h = History().lease(1, 0).op("read", 1, False, 2.2, 2.21).op("keepalive", 1, 2, 2.3, 2.31).final()
    assert "renewed a lease already gone" in check_leases(h.ops, 0.5, []).summary


def test_keys_left_at_the_final_read_and_no_final_read():
    h = History().lease(1, 0).final(["jepsen/lease/1"])
    assert "1 keys never expired" in check_leases(h.ops, 0.5, []).summary
    v = check_leases(History().lease(1, 0).ops, 0.5, [])
    assert not v.valid and v.unknown


def test_leases_whose_grant_is_unknown_are_judged_by_the_final_read_only():
    h = History().op("grant", 1, None, 0, 1, outcome="info").op("read", 1, False, 0.1, 0.2).final()
    v = check_leases(h.ops, 0.5, [])
    assert v.valid and v.details["leases"] == 0
