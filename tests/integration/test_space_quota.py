"""--quota-backend-bytes on a real cluster: fill it, writes refused and reads fine, then delete and
compact, and writes work again with no manual step (the NOSPACE alarm clears itself)."""
from __future__ import annotations

import pytest

from kvstore.client import Client
from kvstore.client.errors import ResourceExhausted
from kvstore.launcher import LocalCluster

from server_cluster import settled

pytestmark = pytest.mark.timeout(240)

QUOTA = 2 << 20
VALUE = b"x" * (64 << 10)


def test_quota_refuses_then_recovers_by_itself(tmp_path):
    lc = LocalCluster.with_free_ports(str(tmp_path), extra_args=["--quota-backend-bytes", str(QUOTA)])
    lc.start()
    try:
        settled(lc)
        with Client(lc.endpoints, timeout=60) as c:  # generous: two cores shared with other loads
            written = 0
            with pytest.raises(ResourceExhausted) as refused:
                for i in range(200):
                    c.put(f"big/{i:03d}", VALUE)
                    written += 1
            msg = str(refused.value)
            assert f"{QUOTA}-byte quota" in msg and "bytes in use" in msg and "--quota-backend-bytes" in msg
            assert 0 < written < 200
            # The alarm is raised through the log: every member knows it.
            lc.wait_for(lambda: any(a == "NOSPACE" for _, a in c.alarms()), 60, "the NOSPACE alarm")
            with pytest.raises(ResourceExhausted):
                c.put("small", "v")
            assert c.get("big/000").kv.value == VALUE  # reads still work
            assert c.range("big/", prefix=True, count_only=True).count == written
            rev = c.delete("big/", prefix=True).revision  # deletes still work
            c.compact(rev)  # and so does compaction

            def writable():
                try:
                    return c.put("after", "v").revision
                except ResourceExhausted:
                    return None

            lc.wait_for(writable, 120, "writes to be accepted again")
            lc.wait_for(lambda: not c.alarms(), 60, "the NOSPACE alarm to clear")
            for i in range(written // 2):  # the freed pages take new data
                c.put(f"again/{i:03d}", VALUE)
    finally:
        lc.stop()
