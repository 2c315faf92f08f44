"""The demo's relay: a TLS echo server on 127.0.0.1 (raw, or WebSocket over the same TLS)
that can be told to misbehave."""

from __future__ import annotations

import random
import socket
import ssl
import struct
from typing import Any, Literal

import trio
import trustme
from trio_websocket import ConnectionClosed, wrap_server_stream

Fault = Literal["none", "flaky", "down", "slow"]

#: ``down``: the relay's cycle, seconds up then seconds down.
UP_FOR, DOWN_FOR = 3.0, 4.0
#: ``flaky``: the share of requests answered with a reset.
FLAKY_RATE = 0.03
#: ``slow``: every third connection answers this late.
SLOW_DELAY = 0.120


class DemoRelay:
    """Echoes what it receives; misbehaves as its ``fault`` says."""

    def __init__(self, fault: Fault, *, websocket: bool = False) -> None:
        self.fault = fault
        self.websocket = websocket  # echo WebSocket messages rather than bytes
        self.ca = trustme.CA(organization_name="trio-securechannel demo (throwaway)")
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(self.server_context)
        self.port = 0
        self.down = False
        self._live: set[trio.SocketStream] = set()
        self._accepted = 0
        self._random = random.Random(2026)

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this relay's throwaway CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ca.configure_trust(context)
        return context

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            if self.fault == "down":
                nursery.start_soon(self._go_down_now_and_then)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _go_down_now_and_then(self) -> None:
        while True:
            await trio.sleep(UP_FOR)
            self.down = True
            self._reset_everything()
            await trio.sleep(DOWN_FOR)
            self.down = False

    def _reset_everything(self) -> None:
        for transport in list(self._live):
            _reset(transport)

    async def _handle(self, transport: trio.SocketStream) -> None:
        self._accepted += 1
        if self.down:
            _reset(transport)  # as if nothing were listening behind the balancer
            return
        slow = self.fault == "slow" and self._accepted % 3 == 0
        stream = trio.SSLStream(transport, self.server_context, server_side=True)
        self._live.add(transport)
        try:
            await stream.do_handshake()
            if self.websocket:
                await self._echo_messages(stream, transport, slow)
                return
            while data := await stream.receive_some():
                if self._flaky_now():
                    _reset(transport)
                    return
                if slow:
                    await trio.sleep(SLOW_DELAY)
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left, or we reset it on purpose
        finally:
            self._live.discard(transport)
            await trio.aclose_forcefully(stream)

    async def _echo_messages(
        self, stream: trio.SSLStream[Any], transport: trio.SocketStream, slow: bool
    ) -> None:
        async with trio.open_nursery() as nursery:  # for the session's reader task
            session = await (await wrap_server_stream(nursery, stream)).accept()
            try:
                while True:
                    message = await session.get_message()
                    if self._flaky_now():
                        _reset(transport)
                        return
                    if slow:
                        await trio.sleep(SLOW_DELAY)
                    await session.send_message(message)
            except ConnectionClosed:
                pass  # the client closed (or went): inside the nursery, so caught here
            finally:
                nursery.cancel_scope.cancel()

    def _flaky_now(self) -> bool:
        return self.fault == "flaky" and self._random.random() < FLAKY_RATE


def _reset(transport: Any) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing server's kernel would."""
    sock = transport.socket
    if sock.fileno() != -1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
