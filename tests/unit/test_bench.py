"""The load generator's statistics, on synthetic latencies (no cluster, no clock).

The figures `kvstore bench` prints are read as ratios against etcd_load.py's,
so the percentile rule and the rate must be exactly what the docs say.
"""
import math
import random

import pytest

from kvstore.bench import LoadSpec, Stats, format_line, percentile, summarize


def test_percentile_nearest_rank_like_etcd_load():
    lat = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1000 ms
    assert percentile(lat, 0.5) == lat[500]
    assert percentile(lat, 0.99) == lat[990]
    assert percentile(lat, 0.999) == lat[999]
    assert percentile(lat, 1.0) == lat[-1]  # clamped to the last element
    assert percentile(lat, 0.0) == lat[0]


def test_percentile_edge_cases():
    assert math.isnan(percentile([], 0.5))
    assert percentile([0.007], 0.999) == 0.007
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summarize_rate_and_percentiles_from_unsorted_input():
    # 10,000 calls in 2 s: 9,900 at 1 ms, 90 at 10 ms, 10 at 100 ms, shuffled.
    lat = [0.001] * 9900 + [0.010] * 90 + [0.100] * 10
    random.Random(7).shuffle(lat)
    s = summarize(lat, 2.0, op="put", clients=16, procs=2, errors=3, first_error="boom")
    assert s.ops == 10_000
    assert s.rate == pytest.approx(5_000.0)
    assert s.p50 == pytest.approx(1.0)
    assert s.p99 == pytest.approx(10.0)  # index 9900 is the first 10 ms sample
    assert s.p999 == pytest.approx(100.0)  # index 9990 is the first 100 ms sample
    assert (s.errors, s.first_error, s.clients, s.procs) == (3, "boom", 16, 2)


def test_summarize_errors_only_is_not_a_division_by_zero():
    s = summarize([], 1.0, errors=5)
    assert s.ops == 0 and s.rate == 0.0 and math.isnan(s.p50)
    assert "p50=-ms" in format_line(s)
    assert summarize([0.001], 0.0).rate == 0.0


def test_format_line_matches_etcd_load_shape():
    s = Stats("get", 128, 2, True, ops=1000, errors=0, elapsed=1.0, rate=1000.0, p50=0.5, p99=1.25, p999=2.0)
    assert format_line(s).startswith("get ops=1000 rate=1000/s p50=0.50ms p99=1.25ms p99.9=2.00ms clients=128")


def test_split_spreads_clients_and_never_leaves_a_process_idle():
    ep = ("127.0.0.1:1",)
    assert LoadSpec(ep, clients=256, procs=2).split() == [128, 128]
    assert LoadSpec(ep, clients=1, procs=4).split() == [1]
    assert LoadSpec(ep, clients=10, procs=4).split() == [3, 3, 2, 2]
    with pytest.raises(ValueError):
        LoadSpec(ep, op="scan")


def test_format_line_appends_the_client_cpu_and_batching_when_measured():
    s = Stats("put", 256, 2, True, ops=1000, errors=0, elapsed=1.0, rate=1000.0, p50=0.5, p99=1.25, p999=2.0,
              extra={"client_cpu_us_per_op": 12.34, "ops_per_rpc": 127.6})
    assert format_line(s).endswith("clients=256 errors=0 client_cpu=12.3us/op ops/rpc=128")
