"""Relays for the tests: a real TLS echo server on 127.0.0.1, and an in-memory one.

Both can be told to misbehave (refuse, hang up, stay silent, answer slowly, reset) and both
count what reaches them, so tests can assert what the pool did on the wire.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import trio
import trio.testing

Mode = Literal[
    "echo", "hangup", "silent", "refuse", "drop_after_handshake", "hang", "deaf", "greet"
]


class _Corkable(trio.abc.Stream):
    """A transport whose sends can be held back and then sent as one write, so that two
    TLS records (a reply and a push) leave in the same TCP segment."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self._held: bytearray | None = None

    def cork(self) -> None:
        self._held = bytearray()

    async def uncork(self, *, hold_back: int = 0, delay: float = 0.0) -> None:
        """Send what was held as one write; or all but its last ``hold_back`` bytes, and
        those ``delay`` seconds later (a record split across TCP segments)."""
        held, self._held = self._held, None
        if not held:
            return
        if hold_back:
            await self.transport.send_all(held[:-hold_back])
            await trio.sleep(delay)
            held = held[-hold_back:]
        await self.transport.send_all(held)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            self._held += data
            await trio.lowlevel.checkpoint()
        else:
            await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.transport.aclose()


class _TLSEchoServer:
    """What both relays do with an accepted byte stream, and what they count."""

    def __init__(self, server_context: ssl.SSLContext) -> None:
        self.server_context = server_context
        self.mode: Mode = "echo"
        self.echo_delay = 0.0
        self.accepts = 0
        self.handshakes = 0
        self.active = 0
        self.max_active = 0
        self.handshaking = 0
        self.max_handshaking = 0
        self.echoed_bytes = 0
        self.requests = 0  # reads that returned data, in every mode that reads
        # Sent unasked right behind each reply, in the same TCP segment, as Electrum
        # servers push notifications.
        self.push_behind_reply: bytes | None = None
        # The push's last 20 bytes follow this much later (half a record waits meanwhile).
        self.push_split_after: float | None = None
        # Close a connection (with a TLS close_notify) after this long without a request,
        # as relays with an idle timeout do.
        self.idle_close_after = float("inf")
        # Send TLS 1.3 session tickets this many seconds after the handshake (a callable:
        # drawn per connection), as OpenSSL-based servers do, on their own or under load;
        # None: with the first reply (trio holds them back until its first write).
        self.tickets_after: float | Callable[[], float] | None = None
        # Each open connection, with a lock so pushes and echoes take turns sending.
        self._tls_streams: dict[trio.SSLStream[Any], trio.Lock] = {}
        # How client connections ended: "close_notify" (a clean TLS close) or "ragged"
        # (TCP closed without one).
        self.endings: Counter[str] = Counter()

    async def handle(self, transport: trio.abc.Stream) -> None:
        self.accepts += 1
        if self.mode in ("hangup", "refuse"):
            await trio.aclose_forcefully(transport)
            return
        if self.mode == "silent":
            # Take the ClientHello and never answer; note when the client gives up.
            async with transport:
                try:
                    while await transport.receive_some():
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client gave up, or reset_connections() closed it
                self.endings["before_tls"] += 1
            return
        corkable = _Corkable(transport)
        stream = trio.SSLStream(corkable, self.server_context, server_side=True)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.handshaking += 1
            self.max_handshaking = max(self.max_handshaking, self.handshaking)
            try:
                await stream.do_handshake()
            finally:
                self.handshaking -= 1
            self.handshakes += 1
            if self.mode == "drop_after_handshake":
                await trio.aclose_forcefully(stream)  # accepts, then serves nobody
                return
            if self.mode == "deaf":
                await trio.sleep_forever()  # completed TLS, reads nothing more
            if self.mode == "greet":
                await stream.send_all(b"220 relay ready\r\n")  # speaks first, then echoes
            if self.tickets_after is not None and stream._delayed_outgoing:
                delay = self.tickets_after
                await trio.sleep(delay() if callable(delay) else delay)
                await stream.transport_stream.send_all(stream._delayed_outgoing)
                stream._delayed_outgoing = None
            send_lock = self._tls_streams[stream] = trio.Lock()
            while True:
                with trio.move_on_after(self.idle_close_after):
                    data = await stream.receive_some()
                    if not data:
                        self.endings["close_notify"] += 1
                        return
                    self.requests += 1
                    if self.mode == "hang":
                        continue  # completed TLS, takes every request, answers none
                    if self.echo_delay:
                        await trio.sleep(self.echo_delay)
                    async with send_lock:
                        push = self.push_behind_reply
                        if push:
                            corkable.cork()
                        await stream.send_all(data)
                        if push:
                            await stream.send_all(push)
                            split = self.push_split_after
                            await corkable.uncork(
                                hold_back=20 if split is not None else 0, delay=split or 0.0
                            )
                    self.echoed_bytes += len(data)
                    continue
                self.endings["relay_idle_close"] += 1
                await stream.aclose()
                return
        except trio.BrokenResourceError:
            self.endings["ragged"] += 1
        except trio.ClosedResourceError:
            pass  # the test shut this connection down itself
        finally:
            self.active -= 1
            self._tls_streams.pop(stream, None)
            await trio.aclose_forcefully(stream)

    async def push(self, data: bytes) -> None:
        """Send ``data`` unasked on every open connection, as a subscription feed would."""
        for stream, send_lock in list(self._tls_streams.items()):
            async with send_lock:
                await stream.send_all(data)


class Relay(_TLSEchoServer):
    """A TLS echo relay on 127.0.0.1 (real sockets), started with ``nursery.start``."""

    def __init__(self, server_context: ssl.SSLContext) -> None:
        super().__init__(server_context)
        self.port = 0
        self._transports: set[trio.SocketStream] = set()
        self._scope: trio.CancelScope | None = None

    @property
    def target(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            await trio.serve_listeners(self._handle_tcp, listeners, task_status=task_status)

    async def _handle_tcp(self, transport: trio.SocketStream) -> None:
        self._transports.add(transport)
        try:
            await self.handle(transport)
        finally:
            self._transports.discard(transport)

    def stop(self) -> None:
        """Close the listener (new connects are refused) and reset every connection."""
        if self._scope is not None:
            self._scope.cancel()
        self.reset_connections()

    def reset_connections(self) -> None:
        """Abort every accepted connection with a TCP RST, as a crashing relay would."""
        for transport in list(self._transports):
            if transport.socket.fileno() == -1:
                continue  # its handler closed it already
            transport.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            transport.socket.close()


class MemoryRelay(_TLSEchoServer):
    """The same relay over in-memory streams, for tests on a `trio.testing.MockClock`.

    Pass ``relay.open_transport`` as the pool's ``open_transport``.
    """

    def __init__(self, server_context: ssl.SSLContext, nursery: trio.Nursery) -> None:
        super().__init__(server_context)
        self._nursery = nursery
        self._servers: set[trio.StapledStream[Any, Any]] = set()
        self.connect_delay = 0.0
        self.connect_times: list[float] = []  # when each connect began (virtual time)
        self.connecting = 0
        self.max_connecting = 0

    def reset_connections(self) -> None:
        """Drop every connection at once, as a crashing relay would."""
        for stream in list(self._servers):
            stream.send_stream.close()
            stream.receive_stream.close()

    async def open_transport(self, host: str, port: int) -> trio.abc.Stream:
        self.connect_times.append(trio.current_time())
        self.connecting += 1
        self.max_connecting = max(self.max_connecting, self.connecting)
        try:
            await trio.sleep(self.connect_delay)
        finally:
            self.connecting -= 1
        if self.mode == "refuse":
            raise ConnectionRefusedError(111, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self._servers.add(server)
        self._nursery.start_soon(self._handle_memory, server)
        return client

    async def _handle_memory(self, server: trio.StapledStream[Any, Any]) -> None:
        try:
            await self.handle(server)
        finally:
            self._servers.discard(server)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
