"""Frozen snapshots of a pool's state: what `status()` and ``/metrics`` read.

A relay's snapshot is taken in one synchronous step (`take_snapshot`), so every figure in
it belongs to the same instant, and readers never reach into the relay's books, breaker or
channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, final

from ._breaker import BreakerState, CircuitBreaker
from ._endpoint import Endpoint
from ._latency import Histogram
from ._slots import Slots
from ._stats import PoolStats


class Latency(NamedTuple):
    """One latency figure: the last one or two rotation windows, and since the start."""

    recent: Histogram
    cumulative: Histogram


@final
@dataclass(frozen=True, slots=True)
class ChannelSnapshot:
    """One open channel."""

    id: int
    in_use: bool
    age: float  # seconds since its handshake completed
    handshake_seconds: float
    round_trips: Histogram  # recent windows


@final
@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A relay's circuit breaker."""

    state: BreakerState
    consecutive_failures: int
    #: Seconds until a checkout may get through; None while the breaker is closed.
    retry_after: float | None
    #: Whether a checkout would get past the breaker now (closed, cooled down, or a trial
    #: left).
    admits: bool
    opened_total: int
    rejected_total: int
    transitions: Mapping[BreakerState, int]  # by the state entered


@final
@dataclass(frozen=True, slots=True)
class RelaySnapshot:
    """One relay of a pool, at one instant."""

    endpoint: str
    websocket: bool
    closed: bool
    idle: int
    in_use: int
    opening: int
    waiting: int
    max_connections: int
    min_idle: int
    opened_total: int
    closed_by_reason: Mapping[str, int]
    breaker: BreakerSnapshot
    errors_by_kind: Mapping[str, int]
    exhausted_total: int
    bytes_sent_total: int
    bytes_received_total: int
    handshakes: Latency
    round_trips: Latency
    acquire_waits: Latency
    #: Each open channel; empty when the snapshot was taken without them.
    channels: tuple[ChannelSnapshot, ...]

    @property
    def healthy(self) -> bool:
        """True while at least one channel is established."""
        return self.idle + self.in_use > 0


@final
@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """A pool at one instant: whether it is closed, and each relay's snapshot, in order."""

    closed: bool
    relays: tuple[RelaySnapshot, ...]


def take_snapshot(
    endpoint: Endpoint,
    books: Slots,
    stats: PoolStats,
    breaker: CircuitBreaker,
    min_idle: int,
    now: float,
    *,
    channels: bool,
) -> RelaySnapshot:
    """Freeze one relay's books, figures and breaker (``channels``: each channel's too)."""
    live = [*books.idle, *books.in_use]
    per_channel = [
        ChannelSnapshot(
            channel.id,
            channel in books.in_use,
            now - channel.opened_at,
            channel.handshake_seconds,
            channel.round_trips.recent(),
        )
        for channel in (live if channels else ())
    ]
    if channels:
        round_trips = Histogram()
        for one in per_channel:
            round_trips.merge(one.round_trips)
    else:
        round_trips = stats.round_trips_recent(live)
    round_trips_cumulative = Histogram()
    round_trips_cumulative.merge(stats.past_round_trips)
    round_trips_cumulative.merge(round_trips)
    return RelaySnapshot(
        endpoint=str(endpoint),
        websocket=endpoint.is_websocket,
        closed=books.closed,
        idle=len(books.idle),
        in_use=len(books.in_use),
        opening=books.opening,
        waiting=len(books.waiters),
        max_connections=books.max_connections,
        min_idle=min_idle,
        opened_total=stats.opened_total,
        closed_by_reason=dict(stats.closed_by_reason),
        breaker=BreakerSnapshot(
            state=breaker.state,
            consecutive_failures=breaker.consecutive_failures,
            retry_after=breaker.retry_after(now),
            admits=breaker.admits(now),
            opened_total=breaker.opened_total,
            rejected_total=breaker.rejected_total,
            transitions={state: breaker.transitions[state] for state in BreakerState},
        ),
        errors_by_kind=dict(stats.errors(books.in_use)),
        exhausted_total=stats.exhausted_total,
        bytes_sent_total=stats.bytes_sent(live),
        bytes_received_total=stats.bytes_received(live),
        handshakes=Latency(
            stats.handshakes.recent(), stats.cumulative(stats.handshakes, stats.past_handshakes)
        ),
        round_trips=Latency(round_trips, round_trips_cumulative),
        acquire_waits=Latency(stats.acquire_waits_recent(), stats.acquire_waits_cumulative()),
        channels=tuple(per_channel),
    )
