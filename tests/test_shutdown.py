"""Leaving `open_pool`: FAULTS.md row 17."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from helpers import books, echo, wait_until


async def test_idle_closed_with_close_notify_and_lent_closed_on_return(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"min_idle": 2, "max_connections": 4, "shutdown_timeout": 5}
    async with trio.open_nursery() as nursery:
        async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
            await wait_until(lambda: books(pool)["idle"] == 2)

            async def hold_a_while(
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                async with pool.connection() as channel:
                    task_status.started()
                    await trio.sleep(0.2)
                    assert await echo(channel, b"late but fine") == b"late but fine"

            await nursery.start(hold_a_while)
            lent_at = trio.current_time()
            await wait_until(lambda: books(pool)["idle"] == 2)  # the spare was replaced
            left_at = trio.current_time()
        # It waited for the lent channel (0.2 s), not for the deadline.
        assert trio.current_time() - lent_at >= 0.2
        assert trio.current_time() - left_at < 5
        status = pool.status()
        assert status["closed"]
        assert status["connections"]["in_use"] == status["connections"]["idle"] == 0
        assert status["connections"]["closed_by_reason"] == {"shutdown": 3}
        with pytest.raises(sc.PoolClosed, match="closed"):
            async with pool.connection():
                pass
    await wait_until(lambda: relay.active == 0)
    assert relay.endings == {"close_notify": 3}  # every channel said goodbye over TLS
    assert not pool.healthy


async def test_channel_never_returned_is_closed_at_the_deadline(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    outcome: list[type[BaseException]] = []
    async with trio.open_nursery() as nursery:
        async with sc.open_pool(
            relay.target, ssl_context=client_context, shutdown_timeout=0.3
        ) as pool:

            async def hog(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    async with pool.connection() as channel:
                        task_status.started()
                        await channel.receive_some()  # the relay never sends unprompted
                except trio.ClosedResourceError as exc:
                    outcome.append(type(exc))

            await nursery.start(hog)
            left_at = trio.current_time()
        assert 0.3 <= trio.current_time() - left_at < 2
    assert outcome == [trio.ClosedResourceError]
    assert pool.status()["connections"]["in_use"] == 0
    assert pool.status()["connections"]["closed_by_reason"] == {"shutdown": 1}
    await wait_until(lambda: relay.active == 0)


async def test_waiters_get_pool_closed(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"max_connections": 1, "acquire_timeout": 60, "shutdown_timeout": 0.2}
    errors: list[BaseException] = []
    async with (
        trio.open_nursery() as nursery,
        sc.open_pool(relay.target, ssl_context=client_context, **options) as pool,
    ):

        async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with pool.connection():
                task_status.started()
                await trio.sleep(0.1)

        async def wait_in_line() -> None:
            try:
                async with pool.connection():
                    pytest.fail("the pool closed before a channel came free")
            except sc.PoolClosed as exc:
                errors.append(exc)

        await nursery.start(hold)
        nursery.start_soon(wait_in_line)
        await trio.testing.wait_all_tasks_blocked()
        assert books(pool)["waiting"] == 1
    assert len(errors) == 1
    assert pool.status()["connections"]["in_use"] == 0


async def test_cancelled_body_still_closes_gracefully(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    with trio.move_on_after(0.2) as scope:
        async with sc.open_pool(relay.target, ssl_context=client_context, min_idle=3) as pool:
            await trio.sleep_forever()
    assert scope.cancelled_caught  # the cancellation came out bare, not in a group
    assert pool.status()["connections"]["closed_by_reason"] == {"shutdown": 3}
    await wait_until(lambda: relay.active == 0)
    assert relay.endings == {"close_notify": 3}


async def test_spares_being_opened_are_abandoned_cleanly(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.NO_TLS
    async with sc.open_pool(relay.target, ssl_context=client_context, min_idle=2) as pool:
        await wait_until(lambda: relay.accepted == 2)
        assert books(pool)["opening"] == 2
    assert books(pool)["opening"] == 0
    assert pool.status()["errors_total"] == 0  # shutting down is not a relay failure
    await wait_until(lambda: relay.endings["before_tls"] == 2)
