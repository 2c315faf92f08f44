"""`WebSocketChannel`: WebSocket messages over one pooled TLS connection (trio-websocket).

The upgrade runs over the channel's own `trio.SSLStream` with trio-websocket's client
connection. Its reader task runs in the pool's nursery, guarded: a relay that refuses the
upgrade or breaks the protocol ends that one channel, never the pool.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, final

import trio
import wsproto
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._channel import Channel
from ._config import PoolConfig
from ._endpoint import Endpoint

logger = logging.getLogger("trio_securechannel")


class UpgradeFailed(Exception):
    """The relay did not complete the WebSocket upgrade (``_connect`` reports it)."""


@final
class WebSocketChannel(Channel):
    """A WebSocket session with a relay, over a pooled TLS connection.

    Check one out with ``async with pool.websocket() as channel``, then
    `send_message` and `get_message`. The pool's rules are those of `SecureChannel`:
    a block that ends on an unanswered `send_message` does not pool the channel (the
    late reply would reach the next user), a message the relay sends to an idle channel
    makes it stale, and after a WebSocket close or error (counted for the breaker like an
    I/O error) calls raise `trio.BrokenResourceError`, after `aclose`
    `trio.ClosedResourceError`. Idle channels are pinged at each cleanup pass.

    Attributes:
        subprotocol: The subprotocol the relay chose, if any.
        The others are `Channel`'s.
    """

    def __init__(
        self,
        ssl_stream: trio.SSLStream[Any],
        endpoint: Endpoint,
        connection: PooledConnection,
        *,
        on_error: Callable[[Channel, str], None] | None = None,
        handshake_seconds: float = 0.0,
    ) -> None:
        super().__init__(
            ssl_stream, endpoint, on_error=on_error, handshake_seconds=handshake_seconds
        )
        self._connection = connection
        self._messages_taken = 0
        self.subprotocol = connection.subprotocol

    async def send_message(self, message: str | bytes) -> None:
        """Send one message: text for a `str`, binary for `bytes`."""
        if not isinstance(message, str | bytes):
            raise TypeError(f"a message is str or bytes, got {type(message).__name__}")
        started = trio.current_time()
        try:
            await self._connection.send_message(message)
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from exc
        except BaseException:
            # Cancelled mid-write: a partial frame may be on the wire.
            self._spend("cancelled")
            raise
        size = len(message.encode() if isinstance(message, str) else message)
        self._sent(started, size, message=True)

    async def get_message(self) -> str | bytes:
        """Wait for the next message from the relay.

        Cancelling the wait loses nothing: a message that arrives later is the next
        call's (but the channel is then unanswered, so it is not pooled again).
        """
        try:
            message = await self._connection.get_message()
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from exc
        self._messages_taken += 1
        self._received(len(message.encode() if isinstance(message, str) else message))
        return message

    def _closed_error(self, exc: ConnectionClosed) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("this channel was closed")
        reason = exc.reason
        if self._connection.too_big:
            # Over our own limit: counted, but no sign the relay is unwell.
            self._fail("too_big", blame_relay=False)
            limit = self._connection._max_message_size
            return trio.BrokenResourceError(
                f"a message from {self.endpoint} was over websocket_max_message_size={limit}"
            )
        if reason is None or reason.code == 1006:  # no close frame: the transport broke
            self._fail("io")
            return trio.BrokenResourceError(f"connection to {self.endpoint} lost")
        self._fail("ws_close")
        detail = f"{reason.code} {reason.name}" + (f": {reason.reason}" if reason.reason else "")
        return trio.BrokenResourceError(f"the WebSocket to {self.endpoint} closed ({detail})")

    async def ping(self) -> None:
        """Send a WebSocket ping and wait for its pong (the pool's keepalive uses this).

        Not a round trip in the figures, and not counted as an error when it fails. A
        ping cancelled before its pong came (a keepalive that timed out) leaves the
        channel ``spent`` as ``"stale"``: the relay may be gone, or the ping half sent.

        Raises:
            trio.BrokenResourceError: The WebSocket is closed, or closed meanwhile.
            trio.ClosedResourceError: This channel was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")
        connection = self._connection
        try:
            await connection.ping()
        except ConnectionClosed:
            self._spend("stale")
            raise trio.BrokenResourceError(f"the WebSocket to {self.endpoint} is closed") from None
        except BaseException:
            self._spend("stale")
            raise
        if connection.reader_done:  # released by the reader's end, not by a pong
            self._spend("stale")
            raise trio.BrokenResourceError(f"the WebSocket to {self.endpoint} is closed")

    def has_pending_input(self) -> bool:
        """True once the WebSocket is closing or closed, or the relay sent a message (or
        part of one, or bytes not read yet) that nobody has taken."""
        connection = self._connection
        return (
            self._closed
            or connection.reader_done
            or connection.closed is not None
            or connection.messages_arrived > self._messages_taken
            or connection.message_in_progress
            or connection.mid_frame
            # Not read yet: perhaps a ping or a pong, but there is no telling.
            or self._unread_bytes()
        )

    async def absorb_handshake_tail(self) -> None:
        """Nothing to do: the reader task already consumes what follows the handshake."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send a close frame (1000), then close TLS with a close_notify, at once.

        The relay's own close frame is not waited for (RFC 6455 would have a client wait
        for the server to close first): a channel leaving the pool costs no round trip,
        and a relay that never answers cannot hold its slot. Forceful if cancelled.
        Idempotent.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._spend("closed")
        await self._connection.close_now()


class PooledConnection(WebSocketConnection):
    """trio-websocket's client connection, with what a pool needs from it.

    trio-websocket 0.12 has no public API for these, so they use its internals (and
    pyproject pins it below 0.13; the tests cover each):

    * counting the data messages (and fragments) the reader receives, so that a message
      that reached an idle channel is seen at checkout;
    * a reader guarded so its exception ends this connection only, and whose end
      releases whoever waits on it (the upgrade, pings), which trio-websocket leaves
      waiting when its reader dies;
    * a close that sends its close frame without waiting for the relay's.
    """

    def __init__(self, stream: trio.SSLStream[Any], endpoint: Endpoint, config: PoolConfig) -> None:
        assert endpoint.websocket_path is not None
        self._frames = FrameWatch(stream)
        super().__init__(
            self._frames,
            wsproto.WSConnection(wsproto.ConnectionType.CLIENT),
            host=endpoint.host_header,
            path=endpoint.websocket_path,
            client_subprotocols=config.websocket_subprotocols,
            client_extra_headers=config.websocket_header_pairs(),
            max_message_size=config.websocket_max_message_size,
        )
        self.endpoint = endpoint
        self.messages_arrived = 0
        self.message_in_progress = False
        self.reader_done = False
        self.reader_error: Exception | None = None
        self.too_big = False  # a message went over websocket_max_message_size

    async def _handle_message_event(
        self, event: wsproto.events.BytesMessage | wsproto.events.TextMessage
    ) -> None:
        # Every fragment of every data message comes through here.
        self.message_in_progress = not event.message_finished
        if event.message_finished:
            self.messages_arrived += 1
        if self._message_size + len(event.data) > self._max_message_size:
            self.too_big = True  # trio-websocket closes with 1009: our limit, not a fault
        await super()._handle_message_event(event)

    async def run_reader(self) -> None:
        """trio-websocket's reader task, guarded; in the pool's nursery."""
        try:
            await self._reader_task()
        except Exception as exc:
            self.reader_error = exc
            if self._open_handshake.is_set():  # (before that, the upgrade reports it)
                level = logging.DEBUG if self.closed is not None else logging.WARNING
                logger.log(level, "WebSocket reader for %s failed: %r", self.endpoint, exc)
            await trio.aclose_forcefully(self._stream)
        finally:
            self.reader_done = True
            self._open_handshake.set()
            for waiting in self._pings.values():
                waiting.set()
            self._pings.clear()

    async def close_now(self, code: int = 1000) -> None:
        """Send a close frame (unless the WebSocket is closing already), then close the
        stream, without waiting for the relay's close frame."""
        try:
            if self._close_reason is None and self._wsproto.state is ConnectionState.OPEN:
                self._close_reason = CloseReason(code, None)  # as trio-websocket's aclose
                with contextlib.suppress(ConnectionClosed):  # (the relay is gone)
                    await self._send(CloseConnection(code=code))
        finally:
            # A reader blocked handing over a message nobody will read must notice.
            self._recv_channel.close()
            await self._stream.aclose()  # a TLS close_notify; forceful if cancelled

    @property
    def mid_frame(self) -> bool:
        """True while the reader holds part of a frame (no event for it yet)."""
        return self._frames.mid_frame

    async def upgraded(self) -> None:
        """Wait for the upgrade to complete, or the reader to end first."""
        await self._open_handshake.wait()


@final
class FrameWatch(trio.abc.Stream):
    """The TLS stream as trio-websocket reads it, watched for WebSocket frame boundaries.

    A frame whose header came in one TLS record and whose rest has not come yet gives the
    reader no event, but it is something the relay sent: an idle channel holding part of
    a frame must not be lent. (Part of a TLS record cannot be seen at all; it is as if it
    arrived just after the checkout.)
    """

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self._stream = stream
        self._upgraded = False
        self._answer_tail = b""  # the end of the HTTP answer so far, to find its end
        self._header = bytearray()  # the current frame's header, while incomplete
        self._payload_left = 0

    @property
    def mid_frame(self) -> bool:
        return bool(self._header) or self._payload_left > 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self._watch(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _watch(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        if not self._upgraded:  # frames start after the HTTP answer to the upgrade
            seen = self._answer_tail + bytes(view)
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                self._answer_tail = seen[-3:]
                return
            self._upgraded = True
            view = memoryview(seen)[end + 4 :]
        while view:
            if self._payload_left:
                taken = min(self._payload_left, len(view))
                self._payload_left -= taken
                view = view[taken:]
                continue
            if not self._header and len(view) >= 2 and len(view) >= _header_length(view):
                self._payload_left = _payload_length(view)  # a whole header: the usual case
                view = view[_header_length(view) :]
                continue
            self._header += view[:1]  # a header split between reads: a byte at a time
            view = view[1:]
            if len(self._header) >= 2 and len(self._header) == _header_length(self._header):
                self._payload_left = _payload_length(self._header)
                self._header.clear()


def _header_length(header: bytearray | memoryview) -> int:
    """RFC 6455 5.2: 2 bytes, a 16- or 64-bit extended length, a 4-byte mask key."""
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)


def _payload_length(header: bytearray | memoryview) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length


async def upgrade(
    ssl_stream: trio.SSLStream[Any], endpoint: Endpoint, nursery: trio.Nursery, config: PoolConfig
) -> PooledConnection:
    """Run the WebSocket upgrade over ``ssl_stream``; the reader task goes to ``nursery``.

    Raises:
        UpgradeFailed: The relay refused the upgrade, answered something else, or closed
            the connection (or the WebSocket) first.
    """
    connection = PooledConnection(ssl_stream, endpoint, config)
    nursery.start_soon(connection.run_reader, name=f"WebSocket reader for {endpoint}")
    await connection.upgraded()
    error = connection.reader_error
    if isinstance(error, ConnectionRejected):
        raise UpgradeFailed(f"WebSocket upgrade refused: HTTP {error.status_code}") from error
    if error is not None:
        raise UpgradeFailed(f"WebSocket upgrade failed: {_describe(error)}") from error
    if connection.reader_done:
        raise UpgradeFailed("the relay closed the connection during the WebSocket upgrade")
    if connection.closed is not None:  # the close came with the upgrade's answer
        code = connection.closed
        raise UpgradeFailed(f"the relay closed the WebSocket right after the upgrade ({code})")
    return connection


def _describe(error: Exception) -> str:
    if isinstance(error, RemoteProtocolError):
        return f"not a WebSocket upgrade answer ({error})"
    if isinstance(error, LocalProtocolError):
        # Raised on our side, its message may quote our own request (and its headers).
        return "not a WebSocket upgrade answer"
    return repr(error)
