"""`status()`: a pool's snapshot as JSON-serialisable data, per relay and in total.

Its shape is `PoolStatus` and the typed dicts nested in it: every key they declare is
always there (a figure not known yet is None, never missing), and no other key appears.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Literal, TypedDict

from ._breaker import BreakerState
from ._latency import Histogram
from ._snapshot import ChannelSnapshot, PoolSnapshot, RelaySnapshot

# How good a breaker state is for serving, best first: a pool reports its best relay's.
SERVING_ORDER = (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)

BreakerStateName = Literal["closed", "open", "half_open"]
_STATE_NAMES: dict[BreakerState, BreakerStateName] = {
    BreakerState.CLOSED: "closed",
    BreakerState.OPEN: "open",
    BreakerState.HALF_OPEN: "half_open",
}


class LatencySummary(TypedDict):
    """One latency figure over the recent windows (the last one or two
    ``histogram_rotation_interval`` periods).

    Keys:
        count (int): Observations.
        p50_ms (float | None): The median, in milliseconds; None before the first
            observation. Bucketed: right to within about 25%.
        p90_ms (float | None): The 90th percentile, likewise.
        p99_ms (float | None): The 99th percentile, likewise.
    """

    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


class LatencyStatus(TypedDict):
    """The latency figures of a relay, or of a pool (over all its relays' windows).

    Keys:
        handshake (LatencySummary): TLS handshakes (after the TCP connect; for ``wss://``
            the WebSocket upgrade too).
        round_trip (LatencySummary): From a send to the next receive that returns data.
        acquire_wait (LatencySummary): How long checkouts waited for a channel.
    """

    handshake: LatencySummary
    round_trip: LatencySummary
    acquire_wait: LatencySummary


class ConnectionsStatus(TypedDict):
    """A relay's channels (or a pool's, summed over its relays).

    Keys:
        idle (int): Open and waiting in the pool.
        in_use (int): Lent out.
        opening (int): Being connected (TCP, TLS, upgrade, ``setup``).
        waiting (int): Checkouts waiting their turn for a channel.
        max (int): ``max_connections`` (per relay, as configured).
        min_idle (int): ``min_idle`` (per relay, as configured).
        opened_total (int): Channels opened since the pool started.
        closed_total (int): Channels closed since the pool started.
        closed_by_reason (dict[str, int]): ``closed_total`` by reason (``"idle"``,
            ``"error"``, ... see :doc:`observability`); a reason appears once it occurred.
    """

    idle: int
    in_use: int
    opening: int
    waiting: int
    max: int
    min_idle: int
    opened_total: int
    closed_total: int
    closed_by_reason: dict[str, int]


class BreakerStatus(TypedDict):
    """A relay's circuit breaker (a pool's: its best relay's state, see `PoolStatus`).

    Keys:
        state (str): ``"closed"``, ``"open"`` or ``"half_open"`` (the `BreakerState`'s
            value).
        consecutive_failures (int): Failures since the last success.
        retry_after (float | None): Seconds until a checkout may get through again: None
            while the breaker is closed, 0.0 while a half-open trial may go now. (A pool's
            top-level figure is None while any relay admits checkouts.)
        opened_total (int): Times the breaker opened.
        rejected_total (int): Checkouts refused with `CircuitOpen`.
    """

    state: BreakerStateName
    consecutive_failures: int
    retry_after: float | None
    opened_total: int
    rejected_total: int


class ChannelStatus(TypedDict):
    """One open channel.

    Keys:
        endpoint (str): Its relay (as in `EndpointStatus`'s ``target``).
        id (int): The channel's `~Channel.id`.
        state (str): ``"idle"`` or ``"in_use"``.
        age_s (float): Seconds since its handshake completed.
        handshake_ms (float): How long its handshake took, in milliseconds.
        round_trip (LatencySummary): Its round trips over the recent windows.
    """

    endpoint: str
    id: int
    state: Literal["idle", "in_use"]
    age_s: float
    handshake_ms: float
    round_trip: LatencySummary


class _Figures(TypedDict):
    """The keys a relay's status and a pool's share (each documents them as it means them)."""

    target: str
    healthy: bool
    closed: bool
    connections: ConnectionsStatus
    breaker: BreakerStatus
    errors_total: int
    errors_by_kind: dict[str, int]
    pool_exhausted_total: int
    bytes_sent_total: int
    bytes_received_total: int
    latency: LatencyStatus
    channels: list[ChannelStatus]


class EndpointStatus(_Figures):
    """One relay of a pool: an entry of ``status()["endpoints"]``.

    Keys:
        target (str): The relay, as ``host:port`` or its ``wss://`` URL (a query shown as
            ``?...``).
        healthy (bool): At least one channel is established.
        closed (bool): The pool has begun shutting down.
        connections (ConnectionsStatus): Its channels.
        breaker (BreakerStatus): Its circuit breaker.
        errors_total (int): Errors, each counted once (the sum of ``errors_by_kind``).
        errors_by_kind (dict[str, int]): Errors by kind: ``"io"``, ``"timeout"``,
            ``"protocol"``, ``"too_big"``, ``"dropped"``, and failed connects by phase
            (``"tcp"``, ``"tls"``, ...); a kind appears once it occurred.
        pool_exhausted_total (int): Checkouts that failed with `PoolExhausted`.
        bytes_sent_total (int): Application bytes sent.
        bytes_received_total (int): Application bytes received.
        latency (LatencyStatus): Its latency figures.
        channels (list[ChannelStatus]): Its open channels.
        protocol (str): ``"tls"`` (raw TLS) or ``"websocket"`` (``wss://``).
    """

    protocol: Literal["tls", "websocket"]


class PoolStatus(_Figures):
    """What `SecureChannelPool.status` returns: the pool's figures, and each relay's.

    For a pool of one relay the figures are that relay's. For several, they are the
    relays' sums, except ``connections["max"]`` and ``["min_idle"]`` (per relay, as
    configured), ``breaker["state"]`` (the best relay's: closed, else half-open, else open),
    ``breaker["consecutive_failures"]`` (the smallest), ``breaker["retry_after"]`` (until
    the first relay admits a checkout again) and ``latency`` (over all the relays' recent
    windows together).

    Keys:
        target (str): The relay, or the relays joined by ``", "``.
        healthy (bool): At least one channel is established, on any relay.
        closed (bool): The pool has begun shutting down.
        connections (ConnectionsStatus): The channels.
        breaker (BreakerStatus): The breakers.
        errors_total (int): Errors, each counted once.
        errors_by_kind (dict[str, int]): Errors by kind, as in `EndpointStatus`.
        pool_exhausted_total (int): Checkouts that failed with `PoolExhausted`.
        bytes_sent_total (int): Application bytes sent.
        bytes_received_total (int): Application bytes received.
        latency (LatencyStatus): The latency figures.
        channels (list[ChannelStatus]): Every open channel, on every relay.
        protocol (str): ``"tls"`` or ``"websocket"``; ``"mixed"`` for a pool of both.
        endpoints (list[EndpointStatus]): Each relay's own figures, in the order given.
    """

    protocol: Literal["tls", "websocket", "mixed"]
    endpoints: list[EndpointStatus]


def serving_state(states: Iterable[BreakerState]) -> BreakerState:
    """The breaker state of the relay best able to serve, of the relays' ``states``."""
    present = set(states)
    return next(state for state in SERVING_ORDER if state in present)


def pool_status(snapshot: PoolSnapshot, max_connections: int, min_idle: int) -> PoolStatus:
    """Totals over the relays, and each relay's own under ``endpoints``."""
    relays = snapshot.relays
    per_relay = [relay_status(relay) for relay in relays]
    if len(per_relay) == 1:
        one = per_relay[0]
        return {**one, "closed": snapshot.closed, "endpoints": per_relay}
    errors = _sum_counts(relay.errors_by_kind for relay in relays)
    admitting = any(relay.breaker.admits for relay in relays)
    protocols = {relay["protocol"] for relay in per_relay}
    connections = [relay["connections"] for relay in per_relay]
    return {
        "target": ", ".join(relay.endpoint for relay in relays),
        "protocol": protocols.pop() if len(protocols) == 1 else "mixed",
        "healthy": any(relay.healthy for relay in relays),
        "closed": snapshot.closed,
        "connections": {
            "idle": sum(c["idle"] for c in connections),
            "in_use": sum(c["in_use"] for c in connections),
            "opening": sum(c["opening"] for c in connections),
            "waiting": sum(c["waiting"] for c in connections),
            "max": max_connections,  # per relay, as configured
            "min_idle": min_idle,
            "opened_total": sum(c["opened_total"] for c in connections),
            "closed_total": sum(c["closed_total"] for c in connections),
            "closed_by_reason": _sum_counts(relay.closed_by_reason for relay in relays),
        },
        "breaker": {
            "state": _STATE_NAMES[serving_state(relay.breaker.state for relay in relays)],
            "consecutive_failures": min(r.breaker.consecutive_failures for r in relays),
            "retry_after": None if admitting else min(_retry(r) for r in relays),
            "opened_total": sum(relay.breaker.opened_total for relay in relays),
            "rejected_total": sum(relay.breaker.rejected_total for relay in relays),
        },
        "errors_total": sum(errors.values()),
        "errors_by_kind": errors,
        "pool_exhausted_total": sum(relay.exhausted_total for relay in relays),
        "bytes_sent_total": sum(relay.bytes_sent_total for relay in relays),
        "bytes_received_total": sum(relay.bytes_received_total for relay in relays),
        "latency": {
            "handshake": _summary(_merged(relay.handshakes.recent for relay in relays)),
            "round_trip": _summary(_merged(relay.round_trips.recent for relay in relays)),
            "acquire_wait": _summary(_merged(relay.acquire_waits.recent for relay in relays)),
        },
        "channels": [channel for relay in per_relay for channel in relay["channels"]],
        "endpoints": per_relay,
    }


def relay_status(relay: RelaySnapshot) -> EndpointStatus:
    """One relay's state, counters and latencies."""
    breaker = relay.breaker
    return {
        "target": relay.endpoint,
        "protocol": "websocket" if relay.websocket else "tls",
        "healthy": relay.healthy,
        "closed": relay.closed,
        "connections": {
            "idle": relay.idle,
            "in_use": relay.in_use,
            "opening": relay.opening,
            "waiting": relay.waiting,
            "max": relay.max_connections,
            "min_idle": relay.min_idle,
            "opened_total": relay.opened_total,
            "closed_total": sum(relay.closed_by_reason.values()),
            "closed_by_reason": dict(relay.closed_by_reason),
        },
        "breaker": {
            "state": _STATE_NAMES[breaker.state],
            "consecutive_failures": breaker.consecutive_failures,
            "retry_after": breaker.retry_after,
            "opened_total": breaker.opened_total,
            "rejected_total": breaker.rejected_total,
        },
        "errors_total": sum(relay.errors_by_kind.values()),
        "errors_by_kind": dict(relay.errors_by_kind),
        "pool_exhausted_total": relay.exhausted_total,
        "bytes_sent_total": relay.bytes_sent_total,
        "bytes_received_total": relay.bytes_received_total,
        "latency": {
            "handshake": _summary(relay.handshakes.recent),
            "round_trip": _summary(relay.round_trips.recent),
            "acquire_wait": _summary(relay.acquire_waits.recent),
        },
        "channels": [_channel_status(relay.endpoint, channel) for channel in relay.channels],
    }


def _channel_status(endpoint: str, channel: ChannelSnapshot) -> ChannelStatus:
    return {
        "endpoint": endpoint,
        "id": channel.id,
        "state": "in_use" if channel.in_use else "idle",
        "age_s": round(channel.age, 3),
        "handshake_ms": round(channel.handshake_seconds * 1000, 3),
        "round_trip": _summary(channel.round_trips),
    }


def _summary(histogram: Histogram) -> LatencySummary:
    figures = histogram.summary()
    return {
        "count": figures["count"],
        "p50_ms": figures["p50_ms"],
        "p90_ms": figures["p90_ms"],
        "p99_ms": figures["p99_ms"],
    }


def _retry(relay: RelaySnapshot) -> float:
    return relay.breaker.retry_after or 0.0


def _sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for one in counts:
        total.update(one)
    return dict(total)


def _merged(histograms: Iterable[Histogram]) -> Histogram:
    merged = Histogram()
    for histogram in histograms:
        merged.merge(histogram)
    return merged
