"""Latency histograms: fixed log-spaced buckets, so memory stays flat however much is seen.

Every histogram has the same buckets: ten per decade (the R10 preferred numbers, about 25%
apart) from 10 µs to 100 s, plus one for anything slower. Observing is one bisect and three
additions. Channels keep a current and a previous window and rotate them; what a rotation
drops is folded into the pool's cumulative figures, which Prometheus needs monotonic.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Any, final

_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
#: Upper bounds (seconds) of the buckets; one more bucket holds everything above the last.
BOUNDS: tuple[float, ...] = (
    *(round(m * 10.0**exponent, 12) for exponent in range(-5, 2) for m in _R10),
    100.0,
)
#: The bounds published to Prometheus as ``le`` labels: the 1-2.5-5 series of each decade.
PROMETHEUS_BOUNDS: tuple[float, ...] = tuple(
    bound for bound in BOUNDS if f"{bound:e}"[:4] in ("1.00", "2.50", "5.00")
)

_PUBLISHED = frozenset(PROMETHEUS_BOUNDS)


@final
class Histogram:
    """Counts per bucket, with the sum and count of what was observed."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * (len(BOUNDS) + 1)))
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def observe_zeros(self, times: int) -> None:
        """`observe` (0.0) ``times`` times, without the bisect."""
        self.counts[0] += times
        self.count += times

    def merge(self, other: Histogram) -> None:
        if not other.count:
            return  # (an idle channel's window: common, and status() merges one per channel)
        counts = self.counts
        for index, value in enumerate(other.counts):
            if value:
                counts[index] += value
        self.sum += other.sum
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, interpolated within its bucket; None when empty."""
        return self._quantile(q, list(accumulate(self.counts))) if self.count else None

    def _quantile(self, q: float, cumulative: list[int]) -> float:
        rank = q * self.count
        # The first bucket whose running total reaches the rank (never an empty one: for
        # rank 0, the first bucket with anything in it).
        index = bisect_left(cumulative, rank) if rank > 0 else bisect_right(cumulative, 0)
        if index >= len(BOUNDS):
            return BOUNDS[-1]  # beyond the last bound: all we can say
        value = self.counts[index]
        seen = cumulative[index] - value
        lower = BOUNDS[index - 1] if index else 0.0
        return lower + (BOUNDS[index] - lower) * (rank - seen) / value

    def prometheus_buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs for the published bounds, ``+Inf`` last."""
        buckets: list[tuple[str, float]] = []
        seen = 0
        for bound, value in zip(BOUNDS, self.counts, strict=False):
            seen += value
            if bound in _PUBLISHED:
                buckets.append((format(bound, "g"), seen))
        buckets.append(("+Inf", self.count))
        return buckets

    def summary(self) -> dict[str, Any]:
        """Count and p50/p90/p99 in milliseconds, for `status()`."""

        if not self.count:
            return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}
        cumulative = list(accumulate(self.counts))

        def ms(q: float) -> float:
            return round(self._quantile(q, cumulative) * 1000, 3)

        return {"count": self.count, "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99)}


@final
class RotatingHistogram:
    """A current and a previous window; `rotate` drops the previous one and returns it."""

    __slots__ = ("current", "previous", "window_started")

    def __init__(self, now: float) -> None:
        self.current = Histogram()
        self.previous: Histogram | None = None
        self.window_started = now

    def observe(self, seconds: float) -> None:
        self.current.observe(seconds)

    def rotate_if_due(self, now: float, interval: float) -> Histogram | None:
        """Start a new window if this one is ``interval`` old; return the dropped window."""
        if now - self.window_started < interval:
            return None
        dropped, self.previous = self.previous, self.current
        self.current = Histogram()
        self.window_started = now
        return dropped

    def windows(self) -> tuple[Histogram, ...]:
        return (self.current,) if self.previous is None else (self.current, self.previous)

    def recent(self) -> Histogram:
        """Both windows together: the last one to two rotation intervals."""
        merged = Histogram()
        for window in self.windows():
            merged.merge(window)
        return merged
