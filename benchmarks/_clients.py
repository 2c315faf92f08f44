"""The client side shared by the measurements: raw streams, round trips, the minimal pool.

The baselines are what a user would write by hand with trio alone: dedicated
`trio.SSLStream`s, and a `trio.Semaphore` over a `collections.deque` of them.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, final

import trio

from trio_securechannel import SecureChannelPool

from ._tls import HOST

#: The message of every echo round trip.
PAYLOAD = bytes(range(64))

RawStream = trio.SSLStream[trio.SocketStream]


async def round_trip(stream: trio.abc.Stream, payload: bytes = PAYLOAD) -> None:
    """Send ``payload`` and read exactly as many bytes back."""
    await stream.send_all(payload)
    missing = len(payload)
    while missing:
        data = await stream.receive_some(missing)
        if not data:
            raise trio.BrokenResourceError("the echo server closed the connection")
        missing -= len(data)


async def open_raw(address: tuple[str, int], context: ssl.SSLContext) -> RawStream:
    """A TLS stream as trio alone gives it: TCP connect, then a verified handshake."""
    transport = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(transport, context, server_hostname=HOST)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def open_raws(
    address: tuple[str, int], context: ssl.SSLContext, n: int, *, concurrency: int | None = None
) -> list[RawStream]:
    """``n`` raw streams, each with one round trip done (so TLS 1.3 tickets are read).

    At most ``concurrency`` handshakes are under way at once (default: all ``n``).
    """
    opening = trio.Semaphore(concurrency or n)
    streams: list[RawStream] = []

    async def one() -> None:
        async with opening:
            stream = await open_raw(address, context)
            streams.append(stream)
            await round_trip(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return streams


async def close_all(streams: Sequence[trio.abc.AsyncResource]) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.aclose)


async def fill(
    pool: SecureChannelPool,
    n: int,
    *,
    concurrency: int | None = None,
    exchange: Callable[[trio.abc.Stream], Awaitable[object]] = round_trip,
) -> None:
    """Have the pool open ``n`` channels (one ``exchange`` each), all idle afterwards.

    At most ``concurrency`` handshakes are under way at once (default: all ``n``).
    """
    opening = trio.Semaphore(concurrency or n)
    all_held = trio.Event()
    held = 0

    async def hold() -> None:
        nonlocal held
        async with contextlib.AsyncExitStack() as lease:
            async with opening:
                channel = await lease.enter_async_context(pool.connection())
                await exchange(channel)
            held += 1
            if held == n:
                all_held.set()
            await all_held.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(hold)
    if len(pool.channels()) != n:
        raise RuntimeError(f"expected {n} pooled channels, found {len(pool.channels())}")


async def in_tasks(tasks: int, work: Callable[[], Awaitable[None]], each: int) -> int:
    """Run ``work`` ``each`` times in each of ``tasks`` tasks; return how many ran in all."""

    async def loop() -> None:
        for _ in range(each):
            await work()

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(loop)
    return tasks * each


@final
class MiniPool:
    """The hand-written baseline: a `trio.Semaphore` guarding a `deque` of open streams.

    The minimal legal pool: its checkout checkpoints (`trio.Semaphore.acquire` does, as
    every trio ``async def`` must), and it does nothing else: no liveness check, no
    bookkeeping. Cases 1 and 2 measure it as the floor under the pool, cases 3 and 4 as
    the baseline.
    """

    def __init__(self, streams: Sequence[RawStream]) -> None:
        self._idle = deque(streams)
        self._free = trio.Semaphore(len(streams))

    def connection(self) -> _MiniLease:
        # The lease gets the deque and the semaphore themselves: no calls in between.
        return _MiniLease(self._idle, self._free)


@final
class _MiniLease:
    __slots__ = ("_free", "_idle", "_stream")

    def __init__(self, idle: deque[RawStream], free: trio.Semaphore) -> None:
        self._idle = idle
        self._free = free
        self._stream: RawStream | None = None

    async def __aenter__(self) -> RawStream:
        await self._free.acquire()
        self._stream = self._idle.pop()
        return self._stream

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._stream is not None
        self._idle.append(self._stream)
        self._free.release()


async def on_each(streams: Sequence[trio.abc.Stream], each: int) -> int:
    """``each`` round trips on every stream, one task per stream; return how many in all."""

    async def loop(stream: trio.abc.Stream) -> None:
        for _ in range(each):
            await round_trip(stream)

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(loop, stream)
    return len(streams) * each


#: One bulk write (case 6).
BULK_CHUNK = bytes(64 * 1024)


async def send_bulk(stream: trio.abc.Stream, total: int) -> int:
    """Send ``total`` bytes to the sink in 64 KiB writes and wait for its receipt.

    Returns the number of 64 KiB writes.
    """
    writes = total // len(BULK_CHUNK)
    await stream.send_all((writes * len(BULK_CHUNK)).to_bytes(8, "big"))
    chunk = memoryview(BULK_CHUNK)
    for _ in range(writes):
        await stream.send_all(chunk)
    if await stream.receive_some(1) != b"\x01":
        raise trio.BrokenResourceError("the sink did not confirm the transfer")
    return writes
