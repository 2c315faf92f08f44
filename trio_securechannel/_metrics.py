"""Prometheus metrics of a pool, read from its own figures at scrape time.

A collector, not metric objects updated on every checkout: the hot path pays nothing for
metrics, ``/metrics`` and `status()` can never disagree, and each pool has its own
`prometheus_client.CollectorRegistry`, so two pools in one process never collide. Names
carry the pool's ``namespace``; no label is per connection, so cardinality stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._breaker import BreakerState
from ._latency import Histogram

if TYPE_CHECKING:
    from ._pool import SecureChannelPool

#: The value of ``<namespace>_breaker_state`` for each state.
BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@final
class PoolCollector(Collector):
    """Yields the pool's metrics whenever its registry is scraped."""

    def __init__(self, pool: SecureChannelPool) -> None:
        self._pool = pool

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: names are unique by construction

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        ns = pool.config.namespace
        slots, stats, breaker = pool._slots, pool._stats, pool._breaker
        live = pool.channels()

        yield _counter(f"{ns}_connections_opened", "Channels opened (TLS handshake completed).",
                       stats.opened_total)  # fmt: skip
        closed = CounterMetricFamily(
            f"{ns}_connections_closed", "Channels closed, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.closed_by_reason.items()):
            closed.add_metric([reason], count)
        yield closed

        connections = GaugeMetricFamily(
            f"{ns}_connections", "Channels by state: idle, in_use, opening.", labels=["state"]
        )
        connections.add_metric(["idle"], len(slots.idle))
        connections.add_metric(["in_use"], len(slots.in_use))
        connections.add_metric(["opening"], slots.opening)
        yield connections
        yield GaugeMetricFamily(
            f"{ns}_waiting", "Checkouts waiting for a free channel.", value=len(slots.waiters)
        )
        yield GaugeMetricFamily(
            f"{ns}_max_connections", "The pool's max_connections.", value=slots.max_connections
        )

        errors = CounterMetricFamily(
            f"{ns}_errors",
            "Failures: connect phases (tcp, tls, timeout) and I/O errors on lent channels (io).",
            labels=["kind"],
        )
        for kind, count in sorted(stats.errors(slots.in_use).items()):
            errors.add_metric([kind], count)
        yield errors
        yield _counter(f"{ns}_pool_exhausted", "Checkouts refused: every channel was in use.",
                       stats.exhausted_total)  # fmt: skip

        yield GaugeMetricFamily(
            f"{ns}_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            value=BREAKER_STATE_VALUES[breaker.state],
        )
        transitions = CounterMetricFamily(
            f"{ns}_breaker_transitions", "Circuit breaker transitions, by state entered.",
            labels=["to"],
        )  # fmt: skip
        for state in BreakerState:
            transitions.add_metric([state.value], breaker.transitions[state])
        yield transitions
        yield _counter(f"{ns}_breaker_rejected", "Checkouts refused by the open circuit breaker.",
                       breaker.rejected_total)  # fmt: skip

        yield _counter(f"{ns}_bytes_sent", "Application bytes sent.", stats.bytes_sent(live))
        yield _counter(
            f"{ns}_bytes_received", "Application bytes received.", stats.bytes_received(live)
        )

        yield _histogram(
            f"{ns}_handshake_seconds", "TLS handshake time, after the TCP connect.",
            stats.cumulative(stats.handshakes, stats.past_handshakes),
        )  # fmt: skip
        yield _histogram(
            f"{ns}_round_trip_seconds", "Time from a send to the next receive returning data.",
            stats.round_trips_cumulative(live),
        )  # fmt: skip
        yield _histogram(
            f"{ns}_acquire_wait_seconds", "Time a checkout waited in line for a channel.",
            stats.cumulative(stats.acquire_waits, stats.past_acquire_waits),
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{ns}_up", "1 while the pool hands out channels, 0 once it is closed.",
            value=0 if slots.closed else 1,
        )  # fmt: skip


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=histogram.prometheus_buckets(), sum_value=histogram.sum
    )
