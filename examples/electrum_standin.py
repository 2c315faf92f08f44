"""A small stand-in Electrum server: a handler for the testing kit's relay.

``electrum_standin`` speaks newline-delimited JSON-RPC on each connection of a
`~trio_securechannel.testing.LoopbackRelay` (TLS on 127.0.0.1, with a throwaway CA). It
answers ``server.version`` (which, as on real servers, must come first in a session),
``server.features``, ``server.ping`` and ``blockchain.headers.subscribe`` (then pushes a new
header a moment later, as a real server does when a block arrives), which is enough to
show and test a client without touching the network::

    async with open_relay(electrum_standin) as relay, sc.open_pool(
        relay.address, ssl_context=relay.client_context()
    ) as pool:
        ...

Needs ``pip install 'trio-securechannel[testing]'`` (trustme), for the kit.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import trio

from trio_securechannel.testing import RelayStream

TIP_HEIGHT = 870_000
HEADER_HEX = "00" * 80
#: Seconds between a ``blockchain.headers.subscribe`` reply and the new block's header.
PUSH_AFTER = 0.2


async def electrum_standin(stream: RelayStream, *, push_after: float = PUSH_AFTER) -> None:
    """Serve one connection until the client leaves (another ``push_after``:
    ``functools.partial(electrum_standin, push_after=...)``)."""
    buffer = b""
    negotiated = False
    async with trio.open_nursery() as nursery:  # for the pushes
        try:
            while data := await stream.receive_some():
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    if not negotiated and request["method"] != "server.version":
                        await stream.aclose()  # as real servers do: version first
                        return
                    negotiated = True
                    await send(stream, {"jsonrpc": "2.0", "id": request["id"],
                                        "result": answer(request)})  # fmt: skip
                    if request["method"] == "blockchain.headers.subscribe":
                        nursery.start_soon(push_new_block, stream, push_after)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away, or the relay was stopped
        finally:
            nursery.cancel_scope.cancel()  # no pushes to a connection that is gone


def answer(request: dict[str, Any]) -> Any:
    method = request["method"]
    if method == "server.version":
        return ["ElectrumX stand-in 1.16.0", "1.4"]
    if method == "server.ping":
        return None
    if method == "server.features":
        return {"server_version": "ElectrumX stand-in 1.16.0", "protocol_max": "1.4"}
    if method == "blockchain.headers.subscribe":
        return {"height": TIP_HEIGHT, "hex": HEADER_HEX}
    return {"error": f"unknown method {method}"}


async def push_new_block(stream: RelayStream, after: float) -> None:
    await trio.sleep(after)
    notification = {"jsonrpc": "2.0", "method": "blockchain.headers.subscribe",
                    "params": [{"height": TIP_HEIGHT + 1, "hex": HEADER_HEX}]}  # fmt: skip
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send(stream, notification)  # sends are serialised: never inside a reply


async def send(stream: RelayStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")
