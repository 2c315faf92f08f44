"""What the testing kit's `LoopbackRelay` does not do: a ``wss://`` relay scripted frame by
frame, and a TCP proxy.

`ScriptedRelay` speaks wsproto directly, for what trio-websocket would not do (fragments
sent apart, a ping inside its close handshake). `Proxy` can black-hole, hold back or reset
what passes through it.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``port``: set ``black_hole`` to swallow
    everything in both directions (the connection stays up), ``hold`` to keep back what
    the relay sends until `deliver_held_now`, or reset every connection."""

    def __init__(self, port: int) -> None:
        self.upstream_port = port
        self.port = 0
        self.black_hole = False
        self.hold = False
        self._held: dict[trio.SocketStream, bytearray] = {}
        self._clients: set[trio.SocketStream] = set()

    def deliver_held_now(self) -> None:
        """Write what was held back to the clients at once, without yielding to trio: the
        bytes are in the client's socket before any task of it can read them."""
        for client, data in self._held.items():
            while data:
                del data[: os.write(client.socket.fileno(), data)]
        self._held.clear()

    @property
    def holding(self) -> int:
        """How many bytes from the relay are held back, not yet delivered."""
        return sum(len(data) for data in self._held.values())

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self._clients.add(client)
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope, client)
        finally:
            self._clients.discard(client)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        pair: trio.CancelScope,
        to_client: trio.SocketStream | None = None,
    ) -> None:
        try:
            while data := await source.receive_some():
                if to_client is not None and self.hold:
                    self._held.setdefault(to_client, bytearray()).extend(data)
                elif not self.black_hole:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pair.cancel()  # one side ended: end both

    def reset_connections(self) -> None:
        """Abort every client connection with a TCP RST."""
        for client in list(self._clients):
            if client.socket.fileno() != -1:
                client.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                client.socket.close()


Script = Callable[[trio.SSLStream[trio.SocketStream], WSConnection], Awaitable[None]]


class ScriptedRelay:
    """A wss:// relay on wsproto: after each upgrade request, ``script(stream, ws)`` runs
    (`accept` and `next_message` help)."""

    def __init__(self, server_context: ssl.SSLContext, script: Script) -> None:
        self.server_context = server_context
        self.script = script
        self.port = 0
        self.close_codes: Counter[int] = Counter()

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, self.server_context, server_side=True)
        ws = WSConnection(ConnectionType.SERVER)
        try:
            async with stream:
                while not any(isinstance(event, Request) for event in ws.events()):
                    data = await stream.receive_some()
                    if not data:
                        return
                    ws.receive_data(bytes(data))
                await self.script(stream, ws)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def accept(stream: trio.SSLStream[trio.SocketStream], ws: WSConnection) -> None:
    await stream.send_all(ws.send(AcceptConnection()))


async def next_message(
    stream: trio.SSLStream[trio.SocketStream], ws: WSConnection
) -> Message[Any] | CloseConnection | None:
    """The next data message (or close) from the client; None at end of stream."""
    while True:
        for event in ws.events():
            if isinstance(event, Message | CloseConnection):
                return event
        data = await stream.receive_some()
        if not data:
            return None
        ws.receive_data(bytes(data))
