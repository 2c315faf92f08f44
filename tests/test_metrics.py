"""Prometheus metrics (rows 25, 7, 8): names, promtool, one registry per pool, errors once."""

from __future__ import annotations

import re
import shutil
import ssl
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import new_relay
from helpers import books, echo, relay_of
from http_client import request

REQUIRED = {
    "connections_opened": "counter",
    "connections_closed": "counter",
    "connections": "gauge",
    "errors": "counter",
    "pool_exhausted": "counter",
    "breaker_state": "gauge",
    "breaker_transitions": "counter",
    "breaker_rejected": "counter",
    "handshake_seconds": "histogram",
    "round_trip_seconds": "histogram",
    "acquire_wait_seconds": "histogram",
    "bytes_sent": "counter",
    "bytes_received": "counter",
}


def samples(
    text: bytes, namespace: str = "securechannel"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, summed over relays (the ``endpoint``
    label), checking the namespace on the way."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.name.startswith(f"{namespace}_"), family.name
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "endpoint"}
            key = (sample.name, tuple(sorted(labels.items())))
            found[key] = found.get(key, 0.0) + sample.value
    return found


async def busy_pool_metrics(
    relay: LoopbackRelay, context: ssl.SSLContext, **options: Any
) -> tuple[bytes, sc.PoolStatus]:
    """Traffic, an exhaustion, a connect failure and a breaker opening, then a scrape."""
    async with sc.open_pool(
        relay.target, ssl_context=context, max_connections=2, **options
    ) as pool:
        for _ in range(5):
            async with pool.connection() as channel:
                assert await echo(channel, b"0123456789") == b"0123456789"
        async with pool.connection(), pool.connection():
            with pytest.raises(sc.PoolExhausted):
                async with pool.connection():
                    pass
        await relay_of(pool).close_idle("test")  # so that the next checkout must connect
        relay.fault = Fault.CLOSE_ON_ACCEPT
        for _ in range(pool.config.breaker_failure_threshold):
            with pytest.raises(sc.ConnectError):
                async with pool.connection():
                    pass
        with pytest.raises(sc.CircuitOpen):
            async with pool.connection():
                pass
        return pool.metrics_text(), pool.status()


async def test_every_required_metric_is_there_with_help_and_units(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    text, status = await busy_pool_metrics(relay, client_context, breaker_failure_threshold=1)
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    for name, kind in REQUIRED.items():
        family = families.get(f"securechannel_{name}")
        assert family is not None, f"securechannel_{name} missing"
        assert family.type == kind, (name, family.type)
        assert family.documentation
        for sample in family.samples:
            # Bounded cardinality: no label names a connection.
            labels = set(sample.labels)
            assert labels <= {"endpoint", "reason", "state", "kind", "to", "le"}, sample
    values = samples(text)
    assert (
        values[("securechannel_connections_opened_total", ())]
        == status["connections"]["opened_total"]
    )
    assert values[("securechannel_pool_exhausted_total", ())] == 1
    assert values[("securechannel_breaker_state", ())] == 2  # open
    assert values[("securechannel_breaker_transitions_total", (("to", "open"),))] == 1
    assert values[("securechannel_breaker_rejected_total", ())] == 1
    assert values[("securechannel_errors_total", (("kind", "tls"),))] == 1
    assert values[("securechannel_bytes_sent_total", ())] == 50 == status["bytes_sent_total"]
    assert values[("securechannel_bytes_received_total", ())] == 50
    assert values[("securechannel_round_trip_seconds_count", ())] == 5
    # Every checkout that got its turn: 5 + 2 + the one that then failed to connect.
    assert values[("securechannel_acquire_wait_seconds_count", ())] == 8
    assert not re.search(rb"_total_total|_seconds_seconds", text)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_exposition_passes_promtool(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    text, _ = await busy_pool_metrics(relay, client_context, breaker_failure_threshold=1)
    checked = await trio.run_process(
        ["promtool", "check", "metrics"],
        stdin=text,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() + checked.stderr.strip() == b""  # not even a lint warning


async def test_two_pools_in_one_process_report_only_their_own(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:

    relays = [new_relay(), new_relay()]
    for relay in relays:
        await nursery.start(relay.serve)
    options: dict[str, Any] = {"ssl_context": client_context, "metrics_port": 0}
    async with (
        sc.open_pool(relays[0].target, namespace="relay_a", **options) as pool_a,
        sc.open_pool(relays[1].target, namespace="relay_b", **options) as pool_b,
    ):
        for pool, round_trips in ((pool_a, 3), (pool_b, 7)):
            for _ in range(round_trips):
                async with pool.connection() as channel:
                    assert await echo(channel, b"x") == b"x"
        assert pool_a.metrics_address != pool_b.metrics_address
        assert pool_a.metrics_address is not None
        assert pool_b.metrics_address is not None
        scraped_a = await request(pool_a.metrics_address, "/metrics")
        scraped_b = await request(pool_b.metrics_address, "/metrics")
    a, b = samples(scraped_a.body, "relay_a"), samples(scraped_b.body, "relay_b")
    assert a[("relay_a_round_trip_seconds_count", ())] == 3
    assert b[("relay_b_round_trip_seconds_count", ())] == 7
    assert a[("relay_a_bytes_sent_total", ())] == 3
    assert b[("relay_b_bytes_sent_total", ())] == 7
    for relay in relays:
        relay.stop()


async def test_errors_are_counted_once_under_mixed_failures(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    """Every failure a caller sees is one error, whether the channel is live or gone."""
    seen_by_callers = {"tls": 0, "io": 0}
    options: dict[str, Any] = {"breaker_failure_threshold": 1000, "max_connections": 4}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        for round_number in range(12):
            relay.fault = Fault.CLOSE_ON_ACCEPT if round_number % 3 == 0 else Fault.NONE
            try:
                async with pool.connection() as channel:
                    assert await echo(channel, b"ping") == b"ping"
                    if round_number % 2:
                        relay.kill_connections()  # mid-use: the next read breaks
                        try:
                            await channel.receive_some()
                        except trio.BrokenResourceError:
                            seen_by_callers["io"] += 1
                            # While the broken channel is still lent, status and metrics agree.
                            live = pool.status()["errors_total"]
                            metric = _errors_in(pool.metrics_text())
                            assert live == metric
                            raise
            except sc.ConnectError:
                seen_by_callers["tls"] += 1
            except trio.BrokenResourceError:
                pass
        status = pool.status()
        metric_errors = samples(pool.metrics_text())
    assert seen_by_callers["io"] > 0
    assert seen_by_callers["tls"] > 0
    assert status["errors_by_kind"] == seen_by_callers
    assert status["errors_total"] == sum(seen_by_callers.values())
    for kind, count in seen_by_callers.items():
        assert metric_errors[("securechannel_errors_total", (("kind", kind),))] == count


def _errors_in(text: bytes) -> float:
    return sum(
        value for (name, _), value in samples(text).items() if name == "securechannel_errors_total"
    )


async def test_slow_channels_are_retired_and_replaced(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    """Row 8: a relay answering slower than max_latency_ms loses its channels at the pass."""
    memory_relay.latency = 0.050  # 50 ms per round trip, in virtual time
    options: dict[str, Any] = {"max_latency_ms": 20, "cleanup_interval": 5.0, "min_idle": 1}
    start = trio.current_time()
    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=memory_relay.open_memory_stream,
        **options,
    ) as pool:
        async with pool.connection() as channel:
            assert await echo(channel, b"slow") == b"slow"
            summary = pool.status()["channels"]
        slow_id = channel.id
        assert any(c["id"] == slow_id and (c["round_trip"]["p50_ms"] or 0) > 20 for c in summary)
        await trio.sleep_until(start + 4.99)
        assert not channel.closed
        await trio.sleep_until(start + 5.01)  # the pass at t=5 retires it
        assert channel.closed
        assert books(pool)["closed_by_reason"] == {"slow": 1}
        assert books(pool)["idle"] == 1  # a fresh spare took its place, as min_idle asks
        memory_relay.latency = 0.001
        async with pool.connection() as fast:
            assert fast.id != slow_id
            assert await echo(fast, b"fast") == b"fast"
        await trio.sleep_until(start + 10.01)
        assert books(pool)["closed_by_reason"] == {"slow": 1}  # 1 ms is fine


@pytest.mark.parametrize(
    ("round_trip", "limit_ms", "retired"),
    [(0.260, 280, False), (0.310, 300, True), (0.0099, 9.5, True), (0.0095, 9.9, False)],
)
async def test_slow_threshold_is_exact_near_the_limit(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
    round_trip: float,
    limit_ms: float,
    retired: bool,
) -> None:
    memory_relay.latency = round_trip
    options: dict[str, Any] = {"max_latency_ms": limit_ms, "cleanup_interval": 5.0}
    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=memory_relay.open_memory_stream,
        **options,
    ) as pool:
        for _ in range(3):
            async with pool.connection() as channel:
                assert await echo(channel, b"t") == b"t"
        assert channel.recent_round_trip() == pytest.approx(round_trip)
        await trio.sleep(5.1)
        assert channel.closed is retired


async def test_counters_never_go_down(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    """Prometheus reads any dip as a counter reset: check after every scheduling step."""

    class Monotonic(trio.abc.Instrument):
        def __init__(self, pool: sc.SecureChannelPool) -> None:
            self.pool, self.last, self.checks = pool, (0.0, 0.0, 0.0, 0.0), 0

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            values = samples(self.pool.metrics_text())
            now = (
                values[("securechannel_bytes_sent_total", ())],
                values[("securechannel_round_trip_seconds_count", ())],
                sum(
                    v
                    for (name, _), v in values.items()
                    if name == "securechannel_connections_closed_total"
                ),
                sum(v for (name, _), v in values.items() if name == "securechannel_errors_total"),
            )
            assert all(a >= b for a, b in zip(now, self.last, strict=True)), (self.last, now)
            self.last = now
            self.checks += 1

    options: dict[str, Any] = {"idle_timeout": 2.0, "cleanup_interval": 1.0, "max_connections": 4}
    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=memory_relay.open_memory_stream,
        **options,
    ) as pool:
        monitor = Monotonic(pool)
        trio.lowlevel.add_instrument(monitor)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(_round_trips, pool, 5)
            await trio.sleep(3.5)  # the cleanup pass reaps all four while we watch
            assert books(pool)["closed_by_reason"] == {"idle": 4}
        finally:
            trio.lowlevel.remove_instrument(monitor)
    assert monitor.checks > 50
    assert monitor.last[:3] == (20.0, 20.0, 4.0)


async def _round_trips(pool: sc.SecureChannelPool, count: int) -> None:
    for _ in range(count):
        async with pool.connection() as channel:
            assert await echo(channel, b"x") == b"x"
