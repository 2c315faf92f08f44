"""An Electrum protocol client on a trio_securechannel pool, safe under concurrency.

Electrum servers speak newline-delimited JSON-RPC over TLS and require ``server.version``
as the first message of every session: `electrum_handshake` runs it on each new channel
(``setup``), so any number of calls may run at once, each on whichever channel is free.
A subscription keeps its channel while it listens; the client never pools it again.

    python examples/electrum_client.py                       # against a local stand-in
    python examples/electrum_client.py --server electrum.blockstream.info:50002
"""

from __future__ import annotations

import argparse
import ssl
from typing import Any

import trio
import trustme
from electrum_standin import serve_electrum

import trio_securechannel as sc
from trio_securechannel.jsonrpc import JsonRpcClient, electrum_handshake


async def main(server: str | None) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        options: dict[str, Any] = {}
        if server is None:  # a local stand-in, trusted through a throwaway CA
            ca = trustme.CA()
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(server_context)
            port = await nursery.start(serve_electrum, server_context)
            server = f"127.0.0.1:{port}"
            options["ssl_context"] = ssl.create_default_context()
            ca.configure_trust(options["ssl_context"])
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
        nursery.cancel_scope.cancel()
    return results


async def call(
    client: JsonRpcClient, results: dict[str, Any], name: str, method: str, *params: Any
) -> None:
    results[name] = await client.call(method, *params)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="HOST:PORT of a real Electrum server (TLS)")
    trio.run(main, parser.parse_args().server)
