"""Prometheus metrics of a pool, read from its own figures at scrape time.

A collector, not metric objects updated on every checkout: the hot path pays nothing for
metrics, ``/metrics`` and `status()` can never disagree, and each pool has its own
`prometheus_client.CollectorRegistry`, so two pools in one process never collide. Names
carry the pool's ``namespace`` and an ``endpoint`` label naming the relay (bounded by the
relays configured); no label is per connection, so cardinality stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._breaker import BreakerState

if TYPE_CHECKING:
    from ._snapshot import PoolSnapshot

#: The value of ``<namespace>_breaker_state`` for each state.
BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@final
class PoolCollector(Collector):
    """Yields the pool's metrics whenever its registry is scraped."""

    def __init__(self, namespace: str, take_snapshot: Callable[[], PoolSnapshot]) -> None:
        self._namespace = namespace
        self._take_snapshot = take_snapshot  # the pool's, without each channel's figures

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: names are unique by construction

    def collect(self) -> Iterator[Metric]:
        ns = self._namespace
        snapshot = self._take_snapshot()
        families: list[Metric] = []

        def family(kind: Any, name: str, text: str, *labels: str) -> Any:
            metric = kind(f"{ns}_{name}", text, labels=["endpoint", *labels])
            families.append(metric)
            return metric

        opened = family(
            CounterMetricFamily, "connections_opened", "Channels opened (TLS handshake completed)."
        )
        closed = family(
            CounterMetricFamily, "connections_closed", "Channels closed, by reason.", "reason"
        )
        connections = family(
            GaugeMetricFamily, "connections", "Channels by state: idle, in_use, opening.", "state"
        )
        waiting = family(GaugeMetricFamily, "waiting", "Checkouts waiting for a free channel.")
        maximum = family(GaugeMetricFamily, "max_connections", "max_connections, per relay.")
        errors = family(
            CounterMetricFamily,
            "errors",
            "Failures: connect phases (tcp, tls, pin, websocket, setup, timeout) and errors"
            " on lent channels (io; dropped: the relay hung up on a request; timeout: no"
            " reply within request_timeout; protocol: a reply that broke the protocol;"
            " ws_close: the relay closed a lent WebSocket; too_big: a line or message over"
            " its limit).",
            "kind",
        )
        exhausted = family(
            CounterMetricFamily, "pool_exhausted", "Checkouts refused: every channel was in use."
        )
        breaker_state = family(
            GaugeMetricFamily,
            "breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        )
        transitions = family(
            CounterMetricFamily,
            "breaker_transitions",
            "Circuit breaker transitions, by state entered.",
            "to",
        )
        rejected = family(
            CounterMetricFamily,
            "breaker_rejected",
            "Checkouts refused by the open circuit breaker.",
        )
        sent = family(CounterMetricFamily, "bytes_sent", "Application bytes sent.")
        received = family(CounterMetricFamily, "bytes_received", "Application bytes received.")
        handshake = family(
            HistogramMetricFamily, "handshake_seconds", "TLS handshake time, after the TCP connect."
        )
        round_trip = family(
            HistogramMetricFamily,
            "round_trip_seconds",
            "Time from a send to the next receive returning data.",
        )
        acquire = family(HistogramMetricFamily, "acquire_wait_seconds",
                         "Time a checkout waited in line for a channel.")  # fmt: skip

        for relay in snapshot.relays:
            name, breaker = relay.endpoint, relay.breaker
            opened.add_metric([name], relay.opened_total)
            for reason, count in sorted(relay.closed_by_reason.items()):
                closed.add_metric([name, reason], count)
            connections.add_metric([name, "idle"], relay.idle)
            connections.add_metric([name, "in_use"], relay.in_use)
            connections.add_metric([name, "opening"], relay.opening)
            waiting.add_metric([name], relay.waiting)
            maximum.add_metric([name], relay.max_connections)
            for kind, count in sorted(relay.errors_by_kind.items()):
                errors.add_metric([name, kind], count)
            exhausted.add_metric([name], relay.exhausted_total)
            breaker_state.add_metric([name], BREAKER_STATE_VALUES[breaker.state])
            for state in BreakerState:
                transitions.add_metric([name, state.value], breaker.transitions[state])
            rejected.add_metric([name], breaker.rejected_total)
            sent.add_metric([name], relay.bytes_sent_total)
            received.add_metric([name], relay.bytes_received_total)
            for histogram_family, latency in (
                (handshake, relay.handshakes),
                (round_trip, relay.round_trips),
                (acquire, relay.acquire_waits),
            ):
                histogram = latency.cumulative
                histogram_family.add_metric(
                    [name], histogram.prometheus_buckets(), sum_value=histogram.sum
                )
        yield from families
        yield GaugeMetricFamily(
            f"{ns}_up", "1 while the pool hands out channels, 0 once it is closed.",
            value=0 if snapshot.closed else 1,
        )  # fmt: skip
