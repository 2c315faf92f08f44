"""An Electrum protocol client on a trio_securechannel pool.

Electrum servers speak newline-delimited JSON-RPC over TLS. Calls are request/reply, so
each takes a channel from the pool and gives it back at a message boundary. A subscription
is different: the server keeps pushing notifications on *that* connection, so it keeps its
channel checked out for as long as it listens (a pooled channel must never carry a
subscription: the pool would find the pushed data on it and close it as stale).

    python examples/electrum_client.py                       # against a local stand-in
    python examples/electrum_client.py --server electrum.blockstream.info:50002
"""

from __future__ import annotations

import argparse
import itertools
import json
import ssl
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import trio
import trustme
from electrum_standin import serve_electrum

import trio_securechannel as sc


class ElectrumError(Exception):
    pass


class ElectrumClient:
    """JSON-RPC calls over a pool's channels."""

    def __init__(self, pool: sc.SecureChannelPool) -> None:
        self._pool = pool
        self._ids = itertools.count()

    async def call(self, method: str, *params: Any) -> Any:
        async with self._pool.connection() as channel:
            return await self._request(Lines(channel), method, params)

    async def subscribe_headers(self) -> AsyncGenerator[dict[str, Any], None]:
        """The current tip, then every new header the server announces."""
        async with self._pool.connection() as channel:  # held while we listen
            lines = Lines(channel)
            yield await self._request(lines, "blockchain.headers.subscribe", ())
            while True:
                message = await lines.next()
                if message.get("method") == "blockchain.headers.subscribe":
                    yield message["params"][0]

    async def _request(self, lines: Lines, method: str, params: Any) -> Any:
        request_id = next(self._ids)
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)}
        await lines.channel.send_all(json.dumps(request).encode() + b"\n")
        while True:  # notifications may arrive before the answer
            message = await lines.next()
            if message.get("id") == request_id:
                if "error" in message:
                    raise ElectrumError(message["error"])
                return message.get("result")


class Lines:
    """Newline-delimited JSON messages read from a channel."""

    def __init__(self, channel: sc.SecureChannel) -> None:
        self.channel = channel
        self._buffer = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            data = await self.channel.receive_some()
            if not data:
                raise trio.BrokenResourceError(f"{self.channel.endpoint} closed the channel")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message


async def main(server: str | None) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        if server is None:  # a local stand-in, trusted through a throwaway CA
            ca = trustme.CA()
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(server_context)
            port = await nursery.start(serve_electrum, server_context)
            target: sc.Target = ("127.0.0.1", port)
            client_context = ssl.create_default_context()
            ca.configure_trust(client_context)
            options: dict[str, Any] = {"ssl_context": client_context}
        else:
            target, options = server, {}  # the system's roots
        results: dict[str, Any] = {}
        async with sc.open_pool(target, max_connections=4, **options) as pool:
            client = ElectrumClient(pool)
            results["version"] = await client.call("server.version", "trio-securechannel", "1.4")
            print("server.version:", results["version"])
            with trio.move_on_after(5):
                async with aclosing(client.subscribe_headers()) as headers:
                    results["tip"] = await anext(headers)
                    print("tip:", results["tip"]["height"])
                    results["next"] = await anext(headers)  # waits for the next block
                    print("new block:", results["next"]["height"])
            results["status"] = pool.status()["connections"]
        nursery.cancel_scope.cancel()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="HOST:PORT of a real Electrum server (TLS)")
    trio.run(main, parser.parse_args().server)
