"""Latency histograms: percentiles, Prometheus buckets, rotation and flat memory (row 26)."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from trio_securechannel._latency import BOUNDS, PROMETHEUS_BOUNDS, Histogram, RotatingHistogram
from trio_securechannel._stats import PoolStats


def test_quantiles_within_bucket_resolution() -> None:
    histogram = Histogram()
    assert histogram.quantile(0.5) is None
    rng = random.Random(26)
    samples = sorted(rng.uniform(0.001, 0.100) for _ in range(10_000))
    for sample in samples:
        histogram.observe(sample)
    for q in (0.5, 0.9, 0.99):
        exact = samples[int(q * len(samples)) - 1]
        estimate = histogram.quantile(q)
        assert estimate is not None
        assert abs(estimate - exact) / exact < 0.25, (q, estimate, exact)  # buckets ~25% wide
    assert histogram.count == 10_000
    assert histogram.sum == pytest.approx(sum(samples))


def test_the_lowest_quantile_is_the_lowest_bucket_with_anything_in_it() -> None:
    histogram = Histogram()
    histogram.observe(0.008)  # bucket (6.3 ms, 8 ms]: the lower ones are empty
    histogram.observe(0.05)
    assert histogram.quantile(0.0) == pytest.approx(0.0063)
    assert histogram.quantile(1.0) == pytest.approx(0.05)


def test_extremes_land_in_the_first_and_overflow_buckets() -> None:
    histogram = Histogram()
    histogram.observe(0.0)
    histogram.observe(1e9)
    assert histogram.counts[0] == 1
    assert histogram.counts[len(BOUNDS)] == 1
    assert histogram.quantile(1.0) == BOUNDS[-1]


def test_prometheus_buckets_are_cumulative_and_end_with_inf() -> None:
    histogram = Histogram()
    for value in (0.00001, 0.0003, 0.002, 0.002, 7.0, 500.0):
        histogram.observe(value)
    buckets = histogram.prometheus_buckets()
    assert [le for le, _ in buckets[:-1]] == [format(b, "g") for b in PROMETHEUS_BOUNDS]
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)  # cumulative, never decreasing
    assert buckets[-1] == ("+Inf", 6)
    assert dict(buckets)["0.0025"] == 4  # 1e-5, 3e-4 and the two 2 ms samples
    assert dict(buckets)["10"] == 5  # everything but the 500 s one


def test_rotation_keeps_two_windows() -> None:
    rotating = RotatingHistogram(now=0.0)
    rotating.observe(0.010)
    assert rotating.rotate_if_due(59.9, 60.0) is None
    assert rotating.rotate_if_due(60.0, 60.0) is None  # nothing dropped yet: no previous
    rotating.observe(0.020)
    assert rotating.recent().count == 2
    dropped = rotating.rotate_if_due(120.0, 60.0)
    assert dropped is not None
    assert dropped.count == 1  # the 10 ms window went out
    assert rotating.recent().count == 1


def test_memory_stays_flat_over_a_million_observations() -> None:
    """Row 26: a million observations, rotated as the cleanup pass does, cost no memory."""
    rng = random.Random(6)
    values = [rng.expovariate(1 / 0.005) for _ in range(1000)]
    tracemalloc.start()
    stats = PoolStats(now=0.0, rotation_interval=60.0)
    channel_windows = RotatingHistogram(now=0.0)

    def run(observations: int, start: float) -> float:
        now = start
        for i in range(observations):
            channel_windows.observe(values[i % 1000])
            stats.acquire_waits.observe(values[(i * 7) % 1000])
            if i % 100 == 99:  # a cleanup pass every hundred round trips
                now += 30.0
                dropped = channel_windows.rotate_if_due(now, 60.0)
                if dropped is not None:
                    stats.past_round_trips.merge(dropped)
                stats.rotate(now, [])
        return now

    try:
        now = run(1_000, start=0.0)  # ten passes: every window has rotated by now
        gc.collect()
        after_thousand = _traced_bytes()
        run(1_000_000, start=now)
        gc.collect()
        after_million = _traced_bytes()
    finally:
        tracemalloc.stop()
    assert stats.past_round_trips.count + channel_windows.recent().count == 1_001_000
    assert after_million <= after_thousand * 1.05, (after_thousand, after_million)


def _traced_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(True, "*trio_securechannel/_latency.py"),
            tracemalloc.Filter(True, "*trio_securechannel/_stats.py"),
        ]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))
