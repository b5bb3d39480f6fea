"""Fixtures and helpers for tests that run real node processes on 127.0.0.1.

Every cluster gets free ports and its own temporary directory, so runs never
collide. Helpers wait for conditions (a leader, caught-up indexes) with
generous deadlines instead of sleeping: two cores are shared by three nodes
and the test itself.
"""
from __future__ import annotations

import pytest

from kvstore.launcher import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 3-member cluster shared by one test module."""
    lc = LocalCluster.with_free_ports(str(tmp_path_factory.mktemp("cluster")))
    lc.start()
    try:
        lc.wait_for_leader(60)
        yield lc
    finally:
        lc.stop()
