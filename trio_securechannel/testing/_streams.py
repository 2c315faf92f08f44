"""The two layers a `LoopbackRelay` puts around each connection, where its faults act.

Below TLS, `Wire`: the connection's bytes, which can be reset (RST) at once, or held back
("corked") so that two TLS records leave in one TCP segment. Above TLS, `RelayStream`: what
a handler reads and writes, where latency, replies in pieces and resets mid-reply happen,
and where the relay counts requests and bytes.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

import trio

from ._faults import Fault

if TYPE_CHECKING:
    from ._relay import LoopbackRelay

#: A piece of a reply sent in pieces waits this long after the previous one, so that
#: each arrives in a read of its own.
PIECE_GAP = 0.001


def reset_socket(sock: trio.socket.SocketType) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing server's kernel would."""
    if sock.fileno() != -1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        trio.lowlevel.notify_closing(sock)  # a task waiting on it wakes (ClosedResourceError)
        sock.close()


@final
class Wire(trio.abc.Stream):
    """The transport under TLS: a TCP connection or an in-memory stream."""

    def __init__(self, transport: trio.abc.Stream, reset: Callable[[], None]) -> None:
        self.transport = transport
        self._reset = reset  # RST for TCP; closing both ends in memory
        self.was_reset = False
        self._held: bytearray | None = None

    def reset(self) -> None:
        self.was_reset = True
        self._reset()

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


@final
class RelayStream(trio.abc.Stream):
    """One connection as a handler sees it: TLS plaintext, with the relay's faults applied.

    Sends are serialised, so `LoopbackRelay.push` may send while a handler replies.
    """

    def __init__(self, relay: LoopbackRelay, tls: trio.SSLStream[Any], wire: Wire) -> None:
        self.relay = relay
        self.tls = tls
        self.wire = wire
        self.saw_eof = False  # the client closed with a TLS close_notify
        self.closed_idle = False
        self.broken = False  # a read or a send found the connection broken
        self.ended = trio.Event()  # reads are over: end of stream, or the connection broke
        # wss://: during the upgrade, which latency, hanging and resets mid-reply leave
        # alone (they are for the messages)
        self.upgrading = False
        self._read_scope: trio.CancelScope | None = None
        self._send_lock = trio.Lock()

    def settings_changed(self) -> None:
        """The relay's fault or idle_close_after changed: a waiting read looks again."""
        if self._read_scope is not None:
            self._read_scope.cancel()

    def reset(self) -> None:
        """Reset this connection now (RST), as a crashing relay would."""
        self.wire.reset()
        self.settings_changed()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        relay = self.relay
        while True:
            try:
                data = await self._receive_unless_idle(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.broken = isinstance(exc, trio.BrokenResourceError)
                self.ended.set()
                raise
            if not data:
                self.saw_eof = True
                self.ended.set()
                return data
            relay.requests += 1
            relay.bytes_received += len(data)
            if relay.fault is not Fault.HANG_AFTER_HANDSHAKE or self.upgrading:
                return data
            # Hanging: taken, never answered.

    async def _receive_unless_idle(self, max_bytes: int | None) -> bytes | bytearray:
        """A read that stops while the relay stops reading, and closes the connection
        (close_notify) once it waited ``idle_close_after`` for a request, as relays with
        an idle timeout do. A change of either setting reaches a read already waiting."""
        relay = self.relay
        began = trio.current_time()
        while True:
            if self.wire.was_reset:
                raise trio.ClosedResourceError("the relay reset this connection")
            stopped = relay.fault is Fault.STOP_READING and not self.upgrading
            with trio.CancelScope(
                deadline=math.inf if stopped else began + relay.idle_close_after
            ) as self._read_scope:
                if stopped:
                    await trio.sleep_forever()
                return await self.tls.receive_some(max_bytes)
            self._read_scope = None
            if stopped or trio.current_time() < began + relay.idle_close_after:
                continue  # a setting changed: look again
            self.closed_idle = True
            await self.tls.aclose()
            raise trio.ClosedResourceError("the relay closed the idle connection")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            try:
                await self._send(data)
            except trio.BrokenResourceError:
                self.broken = True
                raise

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        relay = self.relay
        if relay.latency and not self.upgrading:
            await trio.sleep(relay.latency)
        if relay.fault is Fault.RESET_MID_REPLY and not self.upgrading:
            half = len(data) // 2
            if half:
                await self.tls.send_all(data[:half])
                relay.bytes_sent += half
            self.reset()
            raise trio.BrokenResourceError("the relay reset the connection mid-reply")
        push = relay.push_behind_reply
        if push and not self.upgrading:
            self.wire.cork()
        await self._send_in_pieces(data)
        relay.bytes_sent += len(data)
        if push and not self.upgrading:
            await self.tls.send_all(push)
            relay.bytes_sent += len(push)
            split = relay.push_split_after
            await self.wire.uncork(hold_back=20 if split is not None else 0, delay=split or 0.0)

    async def send_held_tickets(self) -> None:
        """Send the TLS 1.3 session tickets trio holds back until the first write, now
        and on their own (if no reply took them along yet)."""
        async with self._send_lock:
            # trio offers no public way to time them; this is a test relay's licence.
            tickets = self.tls._delayed_outgoing  # noqa: SLF001
            if tickets:
                self.tls._delayed_outgoing = None  # noqa: SLF001
                await self.wire.send_all(tickets)

    async def push(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` unasked, as it is (no latency, no pieces): between replies, never
        inside one."""
        async with self._send_lock:
            await self.tls.send_all(data)
            self.relay.bytes_sent += len(data)

    async def _send_in_pieces(self, data: bytes | bytearray | memoryview) -> None:
        size = self.relay.piece_size
        if not size or len(data) <= size:
            await self.tls.send_all(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), size):
            if start:
                await trio.sleep(PIECE_GAP)
            await self.tls.send_all(view[start : start + size])  # a TLS record each

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.tls.aclose()
