"""`status()`: a pool's snapshot as JSON-serialisable data, per relay and in total."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ._breaker import BreakerState
from ._latency import Histogram
from ._snapshot import PoolSnapshot, RelaySnapshot

# How good a breaker state is for serving, best first: a pool reports its best relay's.
SERVING_ORDER = (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)


def serving_state(states: Iterable[BreakerState]) -> BreakerState:
    """The breaker state of the relay best able to serve, of the relays' ``states``."""
    present = set(states)
    return next(state for state in SERVING_ORDER if state in present)


def pool_status(snapshot: PoolSnapshot, max_connections: int, min_idle: int) -> dict[str, Any]:
    """Totals over the relays, and each relay's own under ``endpoints``."""
    relays = snapshot.relays
    per_relay = [relay_status(relay) for relay in relays]
    if len(per_relay) == 1:
        return {**per_relay[0], "closed": snapshot.closed, "endpoints": per_relay}
    errors = _sum_counts(relay.errors_by_kind for relay in relays)
    admitting = any(relay.breaker.admits for relay in relays)
    return {
        "target": ", ".join(relay.endpoint for relay in relays),
        "healthy": any(relay.healthy for relay in relays),
        "closed": snapshot.closed,
        "connections": {
            **{key: sum(s["connections"][key] for s in per_relay) for key in _COUNTS},
            "max": max_connections,  # per relay, as configured
            "min_idle": min_idle,
            "closed_total": sum(s["connections"]["closed_total"] for s in per_relay),
            "closed_by_reason": _sum_counts(relay.closed_by_reason for relay in relays),
        },
        "breaker": {
            "state": serving_state(relay.breaker.state for relay in relays).value,
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
            name: _merged(getattr(relay, field).recent for relay in relays).summary()
            for name, field in _LATENCIES
        },
        "channels": [
            {**channel, "endpoint": s["target"]} for s in per_relay for channel in s["channels"]
        ],
        "endpoints": per_relay,
    }


def relay_status(relay: RelaySnapshot) -> dict[str, Any]:
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
            "state": breaker.state.value,
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
        "latency": {name: getattr(relay, field).recent.summary() for name, field in _LATENCIES},
        "channels": [
            {
                "id": channel.id,
                "state": "in_use" if channel.in_use else "idle",
                "age_s": round(channel.age, 3),
                "handshake_ms": round(channel.handshake_seconds * 1000, 3),
                "round_trip": channel.round_trips.summary(),
            }
            for channel in relay.channels
        ],
    }


_COUNTS = ("idle", "in_use", "opening", "waiting", "opened_total")
_LATENCIES = (
    ("handshake", "handshakes"),
    ("round_trip", "round_trips"),
    ("acquire_wait", "acquire_waits"),
)


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
