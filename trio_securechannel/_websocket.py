"""`WebSocketChannel`: WebSocket messages over one pooled TLS connection (trio-websocket).

The upgrade runs over the channel's own `trio.SSLStream` with trio-websocket's
client-over-a-stream API. Its reader task runs in the pool's nursery, guarded: a relay
that refuses the upgrade or breaks the protocol ends that one channel, never the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast, final

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from ._channel import Channel
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
        connection: WebSocketConnection,
        reader: GuardedNursery,
        *,
        on_error: Callable[[Channel, str], None] | None = None,
        handshake_seconds: float = 0.0,
    ) -> None:
        super().__init__(
            ssl_stream, endpoint, on_error=on_error, handshake_seconds=handshake_seconds
        )
        self._connection = connection
        self._reader = reader
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
        self._sent(started, len(message.encode() if isinstance(message, str) else message))

    async def get_message(self) -> str | bytes:
        """Wait for the next message from the relay.

        Cancelling the wait loses nothing: a message that arrives later is the next
        call's (but the channel is then unanswered, so it is not pooled again).
        """
        try:
            message = await self._connection.get_message()
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from exc
        self._received(len(message.encode() if isinstance(message, str) else message))
        return message

    def _closed_error(self, exc: ConnectionClosed) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("this channel was closed")
        reason = exc.reason
        if reason is None or reason.code == 1006:  # no close frame: the transport broke
            self._fail("io")
            return trio.BrokenResourceError(f"connection to {self.endpoint} lost")
        self._fail("ws_close")
        detail = f"{reason.code} {reason.name}" + (f": {reason.reason}" if reason.reason else "")
        return trio.BrokenResourceError(f"{self.endpoint} closed the WebSocket ({detail})")

    async def ping(self) -> None:
        """Send a WebSocket ping and wait for its pong (the pool's keepalive uses this).

        Not a round trip in the figures, and not counted as an error when it fails. A
        ping cancelled before its pong came (a keepalive that timed out) leaves the
        channel ``spent`` as ``"stale"``: the relay may be gone, or the ping half sent.

        Raises:
            trio.BrokenResourceError: The WebSocket is closed.
        """
        try:
            await self._connection.ping()
        except ConnectionClosed:
            raise trio.BrokenResourceError(f"the WebSocket to {self.endpoint} is closed") from None
        except BaseException:
            self._spend("stale")
            raise

    def has_pending_input(self) -> bool:
        """True once the WebSocket is closing or closed, or a message waits unread."""
        if self._closed or self._reader.finished or self._connection.closed is not None:
            return True
        return _queued_messages(self._connection) > 0

    async def absorb_handshake_tail(self) -> None:
        """Nothing to do: the reader task already consumes what follows the handshake."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send a close frame (1000), wait for the relay's, then close TLS.

        Bounded by the caller's deadline; forceful if cancelled. Idempotent.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._spend("closed")
        try:
            await self._connection.aclose()
        finally:
            # A forceful close skips this, and a reader blocked handing over a message
            # nobody will read would never notice the stream is gone.
            _message_queue(self._connection).close()
            # trio-websocket leaves the stream open when the relay closed first.
            await self._stream.aclose()


def _message_queue(connection: WebSocketConnection) -> trio.MemoryReceiveChannel[Any]:
    # trio-websocket has no public way to ask whether a message is queued, or to stop
    # delivery: its queue is a trio memory channel (there since 0.9), so use that.
    return connection._recv_channel


def _queued_messages(connection: WebSocketConnection) -> int:
    return _message_queue(connection).statistics().current_buffer_used


class GuardedNursery:
    """The pool's nursery, as trio-websocket sees it: every task it starts there (its
    reader) runs guarded, so an exception ends this connection only.

    ``opening`` is the scope the upgrade waits in: when the reader ends before the
    upgrade completed, it is cancelled, since the wait would otherwise last forever.
    """

    def __init__(self, nursery: trio.Nursery, stream: trio.SSLStream[Any], name: str) -> None:
        self._nursery = nursery
        self._stream = stream
        self._name = name
        self.error: Exception | None = None
        self.finished = False
        self.opening: trio.CancelScope | None = None

    def start_soon(
        self, async_fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> None:
        self._nursery.start_soon(self._guarded, async_fn, args, name=self._name)

    async def _guarded(
        self, async_fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        try:
            await async_fn(*args)
        except Exception as exc:
            self.error = exc
            if self.opening is None:
                logger.warning("%s: WebSocket reader failed: %r", self._name, exc)
            await trio.aclose_forcefully(self._stream)
        finally:
            self.finished = True
            if self.opening is not None:
                self.opening.cancel()


async def upgrade(
    ssl_stream: trio.SSLStream[Any], endpoint: Endpoint, nursery: trio.Nursery
) -> tuple[WebSocketConnection, GuardedNursery]:
    """Run the WebSocket upgrade over ``ssl_stream``; the reader task goes to ``nursery``.

    Raises:
        UpgradeFailed: The relay refused the upgrade, answered something else, or closed
            the connection first.
    """
    assert endpoint.websocket_path is not None
    reader = GuardedNursery(nursery, ssl_stream, f"WebSocket reader for {endpoint}")
    with trio.CancelScope() as reader.opening:
        connection = await wrap_client_stream(
            cast(trio.Nursery, reader), ssl_stream, endpoint.host_header, endpoint.websocket_path
        )
        reader.opening = None
        return connection, reader
    # The reader ended (and cancelled the wait) before the upgrade completed.
    reader.opening = None
    error = reader.error
    if isinstance(error, ConnectionRejected):
        raise UpgradeFailed(f"WebSocket upgrade refused: HTTP {error.status_code}") from error
    if error is not None:
        raise UpgradeFailed(f"WebSocket upgrade failed: {error!r}") from error
    raise UpgradeFailed("the relay closed the connection during the WebSocket upgrade")
