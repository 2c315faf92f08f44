"""Timing logic on the mock clock, over in-memory TLS: reaping, refill pacing, backoff.

Every time asserted here is exact virtual time (``autojump_clock``), so these tests say
*when* things happen, not just that they eventually do. Checks land 0.01 s after an event
is due: tasks woken at the same virtual instant run in no promised order.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
import trio.testing

import trio_securechannel as sc
from trio_securechannel._relay import SPARE_WATCH_MIN as WATCH
from trio_securechannel._upkeep import SPARE_CONCURRENCY
from trio_securechannel.testing import Fault, LoopbackRelay

from helpers import books, echo, relay_of


def memory_pool(relay: LoopbackRelay, context: ssl.SSLContext, **options: Any) -> Any:
    return sc.open_pool(
        "relay.test:443", ssl_context=context, open_transport=relay.open_memory_stream, **options
    )


async def sleep_until_offset(start: float, offset: float) -> None:
    await trio.sleep_until(start + offset)


async def check_out_together(pool: sc.SecureChannelPool, count: int) -> None:
    """Open ``count`` channels at once and give them all back."""
    async with trio.open_nursery() as nursery:
        release = trio.Event()
        for _ in range(count):
            nursery.start_soon(_hold_until, pool, release)
        await trio.testing.wait_all_tasks_blocked()
        release.set()


async def _hold_until(pool: sc.SecureChannelPool, release: trio.Event) -> None:
    async with pool.connection() as channel:
        assert await echo(channel, b"hold") == b"hold"
        await release.wait()


async def test_idle_channels_reaped_at_idle_timeout_keeping_min_idle(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {"idle_timeout": 30.0, "cleanup_interval": 5.0, "min_idle": 1}
    start = trio.current_time()
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await check_out_together(pool, 3)
        assert trio.current_time() == start  # in-memory handshakes take no virtual time
        # With all 3 lent, a 4th was opened as the min_idle spare (pooled once watched).
        await sleep_until_offset(start, WATCH + 0.01)
        assert books(pool)["idle"] == 4
        await sleep_until_offset(start, 29.99)
        assert books(pool)["idle"] == 4
        await sleep_until_offset(start, 30.01)  # the pass at t=30 reaps all but min_idle
        assert books(pool)["idle"] == 1
        assert books(pool)["closed_by_reason"] == {"idle": 3}
        await sleep_until_offset(start, 300)
        assert books(pool)["idle"] == 1  # min_idle is never reaped
        assert memory_relay.endings["close_notify"] == 3  # reaped with a TLS goodbye


async def test_channels_retired_at_max_lifetime(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {"max_lifetime": 12.0, "cleanup_interval": 5.0}
    start = trio.current_time()
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await check_out_together(pool, 2)
        async with pool.connection() as lent:
            await sleep_until_offset(start, 14.0)
            assert books(pool)["idle"] == 1  # the pass at t=10 found nothing old enough
        assert lent.closed  # past its lifetime when given back: closed, not pooled
        assert books(pool)["closed_by_reason"] == {"lifetime": 1}
        await sleep_until_offset(start, 15.01)  # the pass at t=15 retires the idle one
        assert books(pool)["idle"] == 0
        assert books(pool)["closed_by_reason"] == {"lifetime": 2}


async def test_spares_open_a_few_at_a_time_right_away(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.connect_delay = 1.0
    options = {"min_idle": 10, "max_connections": 10, "cleanup_interval": 60.0}
    start = trio.current_time()
    async with memory_pool(memory_relay, client_context, **options) as pool:
        assert SPARE_CONCURRENCY == 4
        # Each batch: a second to connect, then watched a moment before it is pooled.
        batches = [(0.99, 0), (1.01 + WATCH, 4), (2.01 + 2 * WATCH, 8), (3.01 + 3 * WATCH, 10)]
        for offset, idle in [*batches, (10.0, 10)]:
            await sleep_until_offset(start, offset)
            assert books(pool)["idle"] == idle, f"at t={offset}"
        assert memory_relay.max_connecting == SPARE_CONCURRENCY
        assert pool.healthy


async def test_lost_spares_are_replaced_at_once_not_at_the_next_tick(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.connect_delay = 1.0
    options = {"min_idle": 2, "cleanup_interval": 60.0}
    start = trio.current_time()
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await sleep_until_offset(start, 1.01 + WATCH)
        assert books(pool)["idle"] == 2
        with pytest.raises(KeyError):
            async with pool.connection():
                raise KeyError("the application gives up on this channel")
        lost_at = trio.current_time()
        await sleep_until_offset(lost_at, 0.99)
        assert books(pool)["opening"] == 1
        await sleep_until_offset(lost_at, 1.01 + WATCH)
        assert books(pool)["idle"] == 2
        assert books(pool)["opened_total"] == 3


async def test_failing_spares_back_off_exponentially_then_recover(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    start = trio.current_time()
    options = {"min_idle": 1, "breaker_failure_threshold": 100}  # backoff alone, no breaker
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await sleep_until_offset(start, 20.0)
        attempts = [t - start for t in memory_relay.connect_times]
        assert attempts == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5]  # 0.5 s, doubling
        assert pool.status()["errors_by_kind"] == {"tcp": 6}
        assert not pool.healthy
        memory_relay.fault = Fault.NONE
        await sleep_until_offset(start, 31.51 + WATCH)
        assert books(pool)["idle"] == 1  # the attempt at t=31.5 succeeded
        assert [t - start for t in memory_relay.connect_times][-1] == 31.5
        assert pool.healthy


async def test_acquire_and_connect_timeouts_are_exact(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {"max_connections": 1, "acquire_timeout": 2.5, "connect_timeout": 4.0}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        async with pool.connection():
            start = trio.current_time()
            with pytest.raises(sc.PoolExhausted):
                async with pool.connection():
                    pass
            assert trio.current_time() - start == 2.5
        memory_relay.fault = Fault.NO_TLS
        await check_out_together(pool, 0)
        await relay_of(pool).close_idle("test")  # so that the next checkout must connect
        start = trio.current_time()
        with pytest.raises(sc.ConnectError, match="connect_timeout=4s"):
            async with pool.connection():
                pass
        assert trio.current_time() - start == 4.0


async def test_a_transport_error_is_a_connect_error_and_spares_survive(
    autojump_clock: trio.testing.MockClock, client_context: ssl.SSLContext
) -> None:
    async def broken_proxy(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep(0.1)
        raise OSError("proxy misconfigured")

    options: dict[str, Any] = {"min_idle": 2, "breaker_failure_threshold": 100}
    async with sc.open_pool(
        "relay.test:443", ssl_context=client_context, open_transport=broken_proxy, **options
    ) as pool:
        with pytest.raises(sc.ConnectError, match="proxy misconfigured") as info:
            async with pool.connection():
                pass
        assert isinstance(info.value.__cause__, OSError)
        await trio.sleep(60)  # the spare keeper keeps failing, and keeps the pool alive
        assert pool.status()["errors_by_kind"]["tcp"] > 3


async def test_a_bug_in_the_transport_comes_out_as_itself_and_spares_survive(
    autojump_clock: trio.testing.MockClock,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not a failure to connect: the relay is not to blame (no breaker count, no error
    # kind), the caller sees the bug itself, and the spare keeper logs it with its
    # traceback and goes on.
    async def buggy_proxy(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep(0.1)
        raise RuntimeError("proxy misconfigured")

    options: dict[str, Any] = {"min_idle": 2, "breaker_failure_threshold": 1}
    async with sc.open_pool(
        "relay.test:443", ssl_context=client_context, open_transport=buggy_proxy, **options
    ) as pool:
        with pytest.raises(RuntimeError, match="proxy misconfigured"):
            async with pool.connection():
                pass
        await trio.sleep(60)
        status = pool.status()
        assert status["errors_total"] == 0
        assert status["breaker"]["state"] == "closed"
        assert books(pool)["opening"] <= 1  # (a spare may be trying again)
    spare_logs = [r for r in caplog.records if "could not open a spare" in r.getMessage()]
    assert len(spare_logs) > 3
    assert all(r.exc_info is not None for r in spare_logs)  # a bug: with its traceback


async def test_a_relay_down_for_a_thousand_cooldowns_does_not_end_the_pool(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # Each failed spare trial doubles the backoff's exponent: past 1,024 of them, 2**n
    # no longer fits a float (it raised OverflowError, out of the pool's nursery).
    memory_relay.fault = Fault.REFUSE
    options = {"min_idle": 1, "breaker_failure_threshold": 1, "breaker_cooldown": 1.0}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await trio.sleep(1200.0)
        attempts = len(memory_relay.connect_times)
        memory_relay.fault = Fault.NONE
        await trio.sleep(31.0)  # the next trial comes within the longest backoff
        assert pool.breaker_state is sc.BreakerState.CLOSED
    assert 1200.0 / 30.0 <= attempts <= 1200.0 / 0.5  # backed off, never given up
