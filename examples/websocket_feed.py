"""A block feed over WebSocket (wss://) on a trio_securechannel pool.

Calls are request/reply JSON messages, each on a channel checked out for the call and given
back at a message boundary. The block subscription keeps its own channel checked out while
it listens: the relay pushes on that connection, and a pooled channel that received a push
would be closed as stale.

    python examples/websocket_feed.py                        # against a local stand-in
    python examples/websocket_feed.py --url wss://relay.example.com/feed

The local stand-in is `feed_standin`, a handler run by the testing kit's relay
(`trio_securechannel.testing.open_relay` with ``websocket=True``); the kit needs
``pip install 'trio-securechannel[testing]'`` (trustme).
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import trio
from trio_websocket import WebSocketConnection

import trio_securechannel as sc
from trio_securechannel.testing import open_relay

TIP_HEIGHT = 870_000


class FeedClient:
    """JSON calls and a block subscription over a pool's WebSocket channels."""

    def __init__(self, pool: sc.SecureChannelPool) -> None:
        self._pool = pool
        self._ids = itertools.count()

    async def call(self, method: str, **params: Any) -> Any:
        async with self._pool.websocket() as channel:
            return await self._request(channel, method, params)

    async def next_blocks(self, count: int) -> list[dict[str, Any]]:
        """Subscribe, then return the next ``count`` blocks the relay announces."""
        async with self._pool.websocket() as channel:  # held while we listen
            # The relay keeps pushing to a subscribed channel: never lend it to anyone else.
            channel.retire_when_returned("subscribed")
            await self._request(channel, "subscribe", {"topic": "blocks"})
            return [json.loads(await channel.get_message()) for _ in range(count)]

    async def _request(self, channel: sc.WebSocketChannel, method: str, params: Any) -> Any:
        request_id = next(self._ids)
        await channel.send_message(json.dumps({"id": request_id, "method": method, **params}))
        reply = json.loads(await channel.get_message())
        if reply.get("id") != request_id:
            channel.blame_relay()  # it broke the protocol: counted against it, not pooled
            raise sc.ProtocolError(str(channel.endpoint), f"a reply to another request: {reply!r}")
        return reply["result"]


async def main(url: str | None) -> dict[str, Any]:
    if url is not None:
        async with sc.open_pool(url) as pool:
            return await _session(pool)
    # A local stand-in: the testing kit's relay serving wss:// at /feed, running the
    # handler below, trusted through its throwaway CA.
    async with (
        open_relay(feed_standin, websocket=True, path="/feed") as relay,
        sc.open_pool(relay.address, ssl_context=relay.client_context()) as pool,
    ):
        return await _session(pool)


async def _session(pool: sc.SecureChannelPool) -> dict[str, Any]:
    client = FeedClient(pool)
    results = {
        "tip": await client.call("tip"),
        "blocks": await client.next_blocks(2),
        "tip_again": await client.call("tip"),
        "status": pool.status()["connections"],
    }
    for key, value in results.items():
        print(f"{key}: {value}")
    return results


async def feed_standin(session: WebSocketConnection) -> None:
    """The stand-in relay's handler: answers ``tip``, and ``subscribe`` with two blocks.

    It loops until the session ends: ``get_message`` then raises
    `~trio_websocket.ConnectionClosed`, which the kit's relay takes as the end."""
    while True:
        call = json.loads(await session.get_message())
        result = {"height": TIP_HEIGHT} if call["method"] == "tip" else "subscribed"
        await session.send_message(json.dumps({"id": call["id"], "result": result}))
        if call["method"] == "subscribe":
            for height in (TIP_HEIGHT + 1, TIP_HEIGHT + 2):
                await trio.sleep(0.05)
                await session.send_message(json.dumps({"height": height}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a wss:// relay (default: a local stand-in)")
    trio.run(main, parser.parse_args().url)
