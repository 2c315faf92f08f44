"""Cancellation anywhere leaks nothing: FAULTS.md rows 9-11, at every await point.

`CancelAtStep` cancels a scope just before the N-th time a task resumes, so its next
checkpoint raises `trio.Cancelled`; trying every N until the flow completes cancels the flow
at each await point it has, whatever the code path.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from helpers import assert_all_slots_free, books, echo, relay_of, wait_until


class CancelAtStep(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope, step: int) -> None:
        self.task, self.scope, self.step = task, scope, step
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            if self.steps == self.step:
                self.scope.cancel()


async def cancel_at_every_step(
    flow: Callable[[], Awaitable[None]], check: Callable[[], Awaitable[None]]
) -> int:
    """Run ``flow`` cancelled at step 1, 2, ... until it completes; ``check`` after each."""
    step = 0
    while True:
        step += 1
        completed = False

        async def run(
            step: int = step, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            nonlocal completed
            with trio.CancelScope() as scope:
                instrument = CancelAtStep(trio.lowlevel.current_task(), scope, step)
                trio.lowlevel.add_instrument(instrument)
                try:
                    task_status.started()
                    await flow()
                    completed = True
                finally:
                    trio.lowlevel.remove_instrument(instrument)

        async with trio.open_nursery() as nursery:
            await nursery.start(run)
        await check()
        if completed:
            return step
        assert step < 500, "the flow never completed"


async def test_cancel_at_every_await_of_a_fresh_checkout(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"max_connections": 2, "cleanup_interval": 60}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:

        async def flow() -> None:
            async with pool.connection() as channel:
                assert await echo(channel, b"through") == b"through"

        async def check() -> None:
            status = books(pool)
            assert status["in_use"] == status["opening"] == status["waiting"] == 0
            assert status["idle"] <= 1
            # A channel that saw a cancellation never returns to the pool.
            for channel in pool.channels():
                assert channel.reusable
            # Empty the pool so the next run opens (and is cancelled during) a new channel.
            await _drain_idle(pool)

        steps = await cancel_at_every_step(flow, check)
        assert steps > 5  # connect, handshake, send, receive: several await points were hit
        await assert_all_slots_free(pool)


async def test_cancel_at_every_await_of_a_reused_checkout(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context, max_connections=2) as pool:

        async def flow() -> None:
            async with pool.connection() as channel:
                assert await echo(channel, b"again") == b"again"

        async def check() -> None:
            status = books(pool)
            assert status["in_use"] == status["opening"] == 0
            if not status["idle"]:  # the cancelled run discarded it: warm one up again
                await flow()

        await flow()
        steps = await cancel_at_every_step(flow, check)
        assert steps >= 3
        await assert_all_slots_free(pool)


async def test_cancel_while_waiting_for_a_slot(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"max_connections": 1, "acquire_timeout": 60.0}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        release = trio.Event()

        async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with pool.connection():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold)
            with trio.move_on_after(0.05) as scope:
                async with pool.connection():
                    pytest.fail("the only channel is held")
            assert scope.cancelled_caught
            assert books(pool)["waiting"] == 0  # the waiter is gone
            release.set()
        await assert_all_slots_free(pool)


async def test_cancelled_waiter_leaves_the_line_in_order(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"max_connections": 1, "acquire_timeout": 60.0}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        got: list[str] = []
        scopes = {name: trio.CancelScope() for name in ("first", "second", "third")}

        async def use(name: str) -> None:
            with scopes[name]:
                async with pool.connection() as channel:
                    got.append(name)
                    assert await echo(channel, b"hi") == b"hi"

        async with trio.open_nursery() as nursery, pool.connection():
            for name in scopes:
                nursery.start_soon(use, name)
                await trio.testing.wait_all_tasks_blocked()
            assert books(pool)["waiting"] == 3
            scopes["second"].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert books(pool)["waiting"] == 2
        assert got == ["first", "third"]
        assert books(pool)["opened_total"] == 1  # one channel, passed along the line
        await assert_all_slots_free(pool)


async def test_cancel_during_handshake_closes_the_half_made_connection(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.NO_TLS
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with trio.move_on_after(0.1) as scope:
            async with pool.connection():
                pytest.fail("the relay never completes a handshake")
        assert scope.cancelled_caught
        assert books(pool)["opening"] == 0
        assert pool.status()["errors_total"] == 0  # our own cancellation is no failure
        await wait_until(lambda: relay.endings["before_tls"] == 1)
        relay.fault = Fault.NONE
        await assert_all_slots_free(pool)


async def _drain_idle(pool: sc.SecureChannelPool) -> None:
    await relay_of(pool).close_idle("test")
