"""An Electrum protocol client on a trio_securechannel pool, safe under concurrency.

Electrum servers speak newline-delimited JSON-RPC over TLS and require ``server.version``
as the first message of every session: `electrum_handshake` runs it on each new channel
(``setup``), so any number of calls may run at once, each on whichever channel is free.
A subscription keeps its channel while it listens; the client never pools it again.

    python examples/electrum_client.py                       # against a local stand-in
    python examples/electrum_client.py --server electrum.blockstream.info:50002

The local stand-in (``electrum_standin.py``) is a handler run by the testing kit's relay,
`trio_securechannel.testing.open_relay`; the kit needs
``pip install 'trio-securechannel[testing]'`` (trustme).
"""

from __future__ import annotations

import argparse
from typing import Any

import trio
from electrum_standin import electrum_standin

import trio_securechannel as sc
from trio_securechannel.jsonrpc import JsonRpcClient, electrum_handshake
from trio_securechannel.testing import open_relay


async def main(server: str | None) -> dict[str, Any]:
    if server is not None:
        return await session(server)
    # A local stand-in: the testing kit's relay, running the stand-in's handler, trusted
    # through its throwaway CA.
    async with open_relay(electrum_standin) as relay:
        return await session(relay.address, ssl_context=relay.client_context())


async def session(server: str, **options: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with sc.open_pool(
        server,
        setup=electrum_handshake("trio-securechannel example", ("1.4", "1.4.2")),
        max_connections=4,
        request_timeout=10,
        **options,
    ) as pool:
        client = JsonRpcClient(pool)
        async with trio.open_nursery() as calls:  # at once, on separate channels
            for name, method in [("features", "server.features"), ("ping", "server.ping")]:
                calls.start_soon(call, client, results, name, method)
        print("server.features:", results["features"].get("server_version"))
        with trio.move_on_after(5):
            async with client.subscribe("blockchain.headers.subscribe") as headers:
                results["tip"] = headers.result
                print("tip:", results["tip"]["height"])
                new_block = await headers.next_notification()  # waits for a block
                results["next"] = new_block.params[0]
                print("new block:", results["next"]["height"])
        results["status"] = pool.status()["connections"]
    return results


async def call(
    client: JsonRpcClient, results: dict[str, Any], name: str, method: str, *params: Any
) -> None:
    results[name] = await client.call(method, *params)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="HOST:PORT of a real Electrum server (TLS)")
    trio.run(main, parser.parse_args().server)
