"""Exception and time boundaries that must say the truth.

A cancellation is a cancellation even when it comes out of the block as a group; a close
the relay makes slow never holds up the task that gave the channel back; the books change
in steps Ctrl-C cannot split.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
import trio.testing

import trio_securechannel as sc
from trio_securechannel.testing import LoopbackRelay

from conftest import make_server_context
from helpers import books, echo


async def dropped_mid_use(pool: sc.SecureChannelPool, relay: LoopbackRelay) -> None:
    async with pool.connection() as channel:
        assert await echo(channel, b"x") == b"x"
        relay.kill_connections()
        await echo(channel, b"y")


async def test_a_cancelled_block_that_used_a_nursery_vouches_for_nobody(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # With strict exception groups a block cancelled inside its own nursery ends with a
    # BaseExceptionGroup of Cancelled. That is the caller's abort: it must not count as
    # the relay serving well (which would wipe the breaker's count of failures).
    async with sc.open_pool(
        relay.target, ssl_context=client_context, breaker_failure_threshold=3
    ) as pool:
        for _ in range(2):  # two sessions the relay drops mid-use
            with pytest.raises(trio.BrokenResourceError):
                await dropped_mid_use(pool, relay)
        assert pool.status()["breaker"]["consecutive_failures"] == 2
        with trio.move_on_after(0.2) as scope:
            async with pool.connection() as channel, trio.open_nursery() as nursery:
                assert await echo(channel, b"served") == b"served"
                nursery.start_soon(trio.sleep_forever)
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert pool.status()["breaker"]["consecutive_failures"] == 2  # neither blame nor praise
        assert books(pool)["closed_by_reason"]["aborted"] == 1  # and the channel discarded
        with pytest.raises(trio.BrokenResourceError):
            await dropped_mid_use(pool, relay)
        assert pool.breaker_state is sc.BreakerState.OPEN  # the third failure in a row


async def test_a_slow_goodbye_does_not_hold_up_leaving_the_block(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
) -> None:
    # A relay that answers once, then stops reading: the TLS close_notify of a channel
    # past its max_lifetime cannot be written. The goodbye is bounded by shutdown_timeout,
    # but it runs in the pool's nursery: the caller leaves the block at once, within its
    # own deadline.
    endings: list[str] = []

    async def serve_once_then_stop_reading(server: trio.abc.Stream) -> None:
        stream = trio.SSLStream(server, make_server_context(), server_side=True)
        await stream.do_handshake()
        await stream.send_all(await stream.receive_some())
        await trio.sleep(3600.0)  # never reads again
        endings.append("done")

    async def open_transport(host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.lockstep_stream_pair()
        nursery.start_soon(serve_once_then_stop_reading, server)
        return client

    options: dict[str, Any] = {"max_lifetime": 10.0, "shutdown_timeout": 5.0}
    async with sc.open_pool(
        "relay.test:443", ssl_context=client_context, open_transport=open_transport, **options
    ) as pool:
        async with pool.connection() as channel:
            assert await echo(channel, b"once") == b"once"
            await trio.sleep(11.0)  # past max_lifetime: it is closed, not pooled
            ending = trio.current_time()
        assert trio.current_time() - ending == 0.0  # not the 5 s the goodbye may take
        assert channel.closed
        assert books(pool)["closed_by_reason"] == {"lifetime": 1}
        exit_began = trio.current_time()
    assert trio.current_time() - exit_began <= 5.0  # the goodbye was cut at shutdown_timeout


async def test_a_goodbye_that_fails_ends_that_close_only(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # A goodbye runs in the pool's nursery: whatever it raises (here the socket was closed
    # behind the channel's back, so the TLS close_notify meets a closed transport) must
    # not take the pool, or anyone else's block, down with it.
    async with sc.open_pool(
        relay.target, ssl_context=client_context, max_lifetime=0.2, max_connections=2
    ) as pool:
        bystander_done = trio.Event()

        async def bystander() -> None:
            async with pool.connection() as other:
                for _ in range(10):
                    assert await echo(other, b"busy") == b"busy"
                    await trio.sleep(0.05)
            bystander_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            async with pool.connection() as channel:
                assert await echo(channel, b"x") == b"x"
                await channel.ssl_stream.transport_stream.aclose()  # behind its back
                await trio.sleep(0.3)  # past max_lifetime: retired with a goodbye
            await bystander_done.wait()
        assert books(pool)["closed_by_reason"]["lifetime"] >= 1
        assert channel.closed


async def test_ctrl_c_waits_for_a_checkout_to_reach_a_checkpoint(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # A KeyboardInterrupt between the planner reserving a slot and the relay acting on it
    # would leak the slot for good. Like trio's Semaphore.acquire, a checkout is protected
    # as a whole (Ctrl-C lands at its next checkpoint): seen here from inside the user's
    # own open_transport, which the checkout runs.
    protected: list[bool] = []

    async def open_transport(host: str, port: int) -> trio.abc.Stream:
        protected.append(trio.lowlevel.currently_ki_protected())
        return await memory_relay.open_memory_stream(host, port)

    assert not trio.lowlevel.currently_ki_protected()  # (so the check below can fail)
    async with (
        sc.open_pool(
            "relay.test:443", ssl_context=client_context, open_transport=open_transport
        ) as pool,
        pool.connection() as channel,
    ):
        assert await echo(channel, b"x") == b"x"
    assert protected == [True]
