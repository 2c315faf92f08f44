"""A small stand-in Electrum server: newline-delimited JSON-RPC over TLS, on 127.0.0.1.

It answers ``server.version`` (which, as on real servers, must come first in a session),
``server.features``, ``server.ping`` and ``blockchain.headers.subscribe`` (then pushes a new
header a moment later, as a real server does when a block arrives), which is enough to
show and test a client without touching the network.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from typing import Any

import trio

TIP_HEIGHT = 870_000
HEADER_HEX = "00" * 80


async def serve_electrum(
    server_context: ssl.SSLContext,
    *,
    push_after: float = 0.2,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the port it listens on."""

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        buffer = b""
        negotiated = False
        async with trio.open_nursery() as nursery:
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
                pass  # the client went away
            nursery.cancel_scope.cancel()

    tcp_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = tcp_listeners[0].socket.getsockname()[1]
    listeners = [trio.SSLListener(listener, server_context) for listener in tcp_listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(port)


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


async def push_new_block(stream: trio.SSLStream[trio.SocketStream], after: float) -> None:
    await trio.sleep(after)
    notification = {"jsonrpc": "2.0", "method": "blockchain.headers.subscribe",
                    "params": [{"height": TIP_HEIGHT + 1, "hex": HEADER_HEX}]}  # fmt: skip
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send(stream, notification)


async def send(stream: trio.SSLStream[trio.SocketStream], message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")
