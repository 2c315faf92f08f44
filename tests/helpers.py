"""Helpers shared by the tests: round trips, the pool's books, waiting on outside state."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

import trio_securechannel as sc
from trio_securechannel._relay import Relay


def relay_of(pool: sc.SecureChannelPool) -> Relay:
    """The relay of a one-relay pool, for tests that pull its levers directly."""
    (relay,) = pool._relays
    return relay


def books(pool: sc.SecureChannelPool) -> sc.ConnectionsStatus:
    return pool.status()["connections"]


async def assert_all_slots_free(pool: sc.SecureChannelPool) -> None:
    """The FAULTS.md meaning of "slot freed": nothing held, and max checkouts succeed."""
    assert books(pool)["in_use"] == 0
    assert books(pool)["opening"] == 0
    assert books(pool)["waiting"] == 0
    async with trio.open_nursery() as nursery:
        held = trio.Semaphore(0)
        release = trio.Event()

        async def hold() -> None:
            while True:
                try:
                    async with pool.connection() as channel:
                        await channel.send_all(b"ping")
                        assert await channel.receive_some() == b"ping"
                        held.release()
                        await release.wait()
                    return
                except sc.PoolExhausted:
                    # A spare the keeper is opening holds the slot (with acquire_timeout=0
                    # a checkout does not wait for it): taken, not leaked.
                    if not books(pool)["opening"]:
                        raise
                    await trio.sleep(0.01)

        for _ in range(pool.config.max_connections):
            nursery.start_soon(hold)
        for _ in range(pool.config.max_connections):
            await held.acquire()
        assert books(pool)["in_use"] == pool.config.max_connections
        release.set()
    assert books(pool)["in_use"] == 0


async def echo(channel: sc.SecureChannel, payload: bytes) -> bytes:
    await channel.send_all(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await channel.receive_some()
        assert chunk, "the relay closed the channel mid-reply"
        received += chunk
    return received


async def wait_until(predicate: Callable[[], bool], *, within: float = 5.0) -> None:
    """Poll state that no event announces (a relay's socket, the pool's books)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(0.005)


async def check_out_at_once(pool: sc.SecureChannelPool, count: int) -> set[sc.SecureChannel]:
    """``count`` checkouts held at the same time, each echoing once: the channels lent."""
    lent: set[sc.SecureChannel] = set()

    async def check_out_one() -> None:
        async with pool.connection() as channel:
            lent.add(channel)
            assert await echo(channel, b"warm") == b"warm"

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(check_out_one)
    return lent


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
