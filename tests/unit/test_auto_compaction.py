"""Auto-compaction settings and the periodic mode's choice of revision (etcd's rules)."""
from __future__ import annotations

import pytest

from kvstore.server.auto_compaction import AutoCompactor, check_auto_compaction, periodic_retention_s
from kvstore.server.config import parse_args


def test_retention_parsing_follows_etcd():
    assert periodic_retention_s("1h") == 3600 and periodic_retention_s("30m") == 1800
    assert periodic_retention_s("2") == 7200  # a bare number is hours in periodic mode
    check_auto_compaction("revision", "1000", "5m")
    for mode, retention, interval, flag in (("sometimes", "1h", "5m", "--auto-compaction-mode"),
                                            ("revision", "1h", "5m", "--auto-compaction-retention"),
                                            ("periodic", "soon", "5m", "--auto-compaction-retention"),
                                            ("revision", "10", "0", "--auto-compaction-interval")):
        with pytest.raises(ValueError, match=flag):
            check_auto_compaction(mode, retention, interval)
    with pytest.raises(SystemExit):
        parse_args(["--auto-compaction-mode", "sometimes"])
    with pytest.raises(SystemExit):
        parse_args(["--quota-backend-bytes", str(9 << 30)])


def test_periodic_compacts_to_the_revision_one_retention_ago():
    c = AutoCompactor(None, "periodic", "100s", "5m")  # type: ignore[arg-type]  # _target reads samples only
    assert c.period == 10.0
    for t, rev in ((0, 5), (10, 50), (20, 90), (50, 200), (105, 400)):
        c._samples.append((t, rev))
    assert c._target(105) == 5  # the newest sample at least 100 s old
    c._samples.append((115, 450))
    assert c._target(115) == 50
    assert c._target(116) == 50  # nothing newer is old enough yet
