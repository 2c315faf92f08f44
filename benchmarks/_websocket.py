"""Measurement 11: WebSocket message round trips through the pool, against one dedicated
trio-websocket connection, on the same server."""

from __future__ import annotations

import trio_websocket

from trio_securechannel import SecureChannelPool, WebSocketChannel, open_pool

from ._bench import Bench
from ._clients import PAYLOAD
from ._measure import Run, paired_ratio, timed
from ._report import Result

MESSAGE = PAYLOAD  # 64 bytes, as the stream cases


async def websocket_pool_of_1(bench: Bench) -> list[Result]:
    """11: 1 task, pool of 1 wss:// relay vs 1 dedicated trio-websocket connection."""
    context = bench.client_context()
    host, port = bench.servers.ws
    n = bench.scale.round_trips_single
    async with (
        trio_websocket.open_websocket(host, port, "/", use_ssl=context) as dedicated,
        open_pool(f"wss://{host}:{port}/", ssl_context=context, max_connections=1) as pool,
    ):

        async def ours() -> Run:
            return (await timed(lambda: _pooled_round_trips(pool, n))).throughput()

        async def raw() -> Run:
            return (await timed(lambda: _dedicated_round_trips(dedicated, n))).throughput()

        runs = await bench.compare({"ours": ours, "raw": raw})
    ratio = paired_ratio(runs["ours"], runs["raw"])
    return [
        Result(
            "11", "ws1", "1 task, pool of 1 wss:// relay: message round trips", "round trips/s",
            runs["ours"], "1 dedicated trio-websocket connection", runs["raw"],
            ratio, "throughput", "-", None,
            (f"{n} round trips of a {len(MESSAGE)}-byte message per repeat, one checkout"
             " each; no target was set: a figure to watch",),
        )
    ]  # fmt: skip


async def _pooled_round_trips(pool: SecureChannelPool, n: int) -> int:
    for _ in range(n):
        async with pool.websocket() as channel:
            await _round_trip(channel)
    return n


async def _round_trip(channel: WebSocketChannel) -> None:
    await channel.send_message(MESSAGE)
    if await channel.get_message() != MESSAGE:
        raise AssertionError("the echo came back different")


async def _dedicated_round_trips(connection: trio_websocket.WebSocketConnection, n: int) -> int:
    for _ in range(n):
        await connection.send_message(MESSAGE)
        if await connection.get_message() != MESSAGE:
            raise AssertionError("the echo came back different")
    return n
