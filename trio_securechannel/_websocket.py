"""`WebSocketChannel`: WebSocket messages over one pooled TLS connection (trio-websocket).

The upgrade runs over the channel's own `trio.SSLStream` with trio-websocket's public
client API (`trio_websocket.wrap_client_stream`), through a `FrameWatch` that sees each
frame header go by. Each session has a task in the pool's nursery that runs the upgrade,
then trio-websocket's reader in a nursery of its own: a relay that refuses the upgrade or
breaks the protocol ends that one channel, never the pool.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, final

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.utilities import RemoteProtocolError

from ._channel import NO_DEADLINE, Channel
from ._config import PoolConfig
from ._endpoint import Endpoint
from ._frames import FrameWatch

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("trio_securechannel")

#: How long a closing channel waits for the relay's close frame, counted from its own and
#: measured in the relay's round trips (the longer of the upgrade's and the latest
#: messages'): RFC 6455 has the server close first, but a relay that does not answer
#: must not keep its connection open.
CLOSE_PATIENCE_ROUND_TRIPS = 2.0


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
        session: Session,
        *,
        on_error: Callable[[Channel, str], None] | None = None,
        on_trial_answered: Callable[[Channel], None] | None = None,
        handshake_seconds: float = 0.0,
    ) -> None:
        super().__init__(
            ssl_stream,
            endpoint,
            on_error=on_error,
            on_trial_answered=on_trial_answered,
            handshake_seconds=handshake_seconds,
        )
        self._session = session
        self._connection = session.connection
        self._messages_taken = 0
        self.subprotocol = self._connection.subprotocol

    async def send_message(self, message: str | bytes) -> None:
        """Send one message: text for a `str`, binary for `bytes`."""
        if not isinstance(message, str | bytes):
            raise TypeError(f"a message is str or bytes, got {type(message).__name__}")
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("this channel was closed")
        started = trio.current_time()
        try:
            if self.deadline == NO_DEADLINE:
                await self._connection.send_message(message)
            else:
                await self._by_deadline(self._connection.send_message(message))
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
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("this channel was closed")
        try:
            if self.deadline == NO_DEADLINE:
                message = await self._connection.get_message()
            else:
                message = await self._by_deadline(self._connection.get_message())
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from exc
        self._messages_taken += 1
        self._received(len(message.encode() if isinstance(message, str) else message))
        return message

    def _closed_error(self, exc: ConnectionClosed) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("this channel was closed")
        reason = exc.reason
        if reason is not None and reason.code == 1009 and self._session.frames.closed_first:
            # trio-websocket closed with 1009 before the relay closed: a message over our
            # own limit. Counted, but no sign the relay is unwell.
            self._fail("too_big", blame_relay=False)
            limit = self._session.max_message_size
            return trio.BrokenResourceError(
                f"a message from {self.endpoint} was over websocket_max_message_size={limit}"
            )
        if reason is None or reason.code == 1006:  # no close frame: the transport broke
            self._fail("io")
            return trio.BrokenResourceError(f"connection to {self.endpoint} lost")
        self._fail("ws_close")
        return trio.BrokenResourceError(
            f"the WebSocket to {self.endpoint} closed ({_describe_close(reason)})"
        )

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
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("this channel was closed")
        try:
            answered = await self._session.ping()
        except ConnectionClosed:
            self._spend("stale")
            raise trio.BrokenResourceError(f"the WebSocket to {self.endpoint} is closed") from None
        except BaseException:
            self._spend("stale")
            raise
        if not answered:  # the relay closed, or the connection ended, before a pong
            self._spend("stale")
            raise trio.BrokenResourceError(f"the WebSocket to {self.endpoint} is closed")

    def has_pending_input(self) -> bool:
        """True once the WebSocket is closing or closed, or the relay sent a message (or
        part of one, a close frame, or bytes not read yet) that nobody has taken."""
        session = self._session
        frames = session.frames
        return (
            self._closed
            or session.reader_done
            or frames.ended
            or frames.close_received
            or self._connection.closed is not None
            or frames.messages_arrived > self._messages_taken
            or frames.message_in_progress
            or frames.mid_frame
            # Not read yet: perhaps a ping or a pong, but there is no telling.
            or self._unread_bytes()
        )

    async def watch(self, window: float) -> None:
        """Watch for ``window`` seconds: a relay that ends the session at once fails
        (``"dropped"``); the reader task consumes everything else."""
        await trio.sleep(window)
        if self._session.reader_done or self._connection.closed is not None:
            self._fail("dropped")
        elif self.has_pending_input():
            self._spend("unexpected data")

    async def _goodbye(self) -> None:
        """Close the WebSocket (code 1000), then TLS with a close_notify.

        The relay's own close frame is awaited briefly, as RFC 6455 has the server close
        first: for two of its round trips (the longer of the upgrade's and the latest
        messages') after ours went out, or until the connection ends. The caller's
        deadline and ``shutdown_timeout`` bound the whole; forceful if cancelled.
        """
        round_trip = max(self._session.upgrade_seconds, self.recent_round_trip() or 0.0)
        await self._session.close(patience=CLOSE_PATIENCE_ROUND_TRIPS * round_trip)


@final
class Session:
    """One WebSocket session: trio-websocket's client connection over a `FrameWatch`.

    `run` is its task, in the pool's nursery: the upgrade (whose outcome `wait_upgraded`
    reports to the connect), then trio-websocket's reader, in a nursery of its own, until
    the channel closes. Whatever the reader raises ends this session only.

    Only trio-websocket's public API is used; what it does not tell (what arrived on an
    idle channel, whether a close frame went out, the end of the stream) the `FrameWatch`
    sees on the wire.
    """

    def __init__(
        self, ssl_stream: trio.SSLStream[Any], endpoint: Endpoint, config: PoolConfig
    ) -> None:
        self.endpoint = endpoint
        self.frames = FrameWatch(ssl_stream, on_change=self._notice)
        self.max_message_size = config.websocket_max_message_size
        self.upgrade_seconds = 0.0  # the upgrade's round trip, once done
        self._config = config
        self._connection: WebSocketConnection | None = None
        self._task_scope = trio.CancelScope()  # the whole task (the connect gave up on it)
        self._upgrading = trio.CancelScope()  # the wait for the upgrade's answer
        self._close_handshake = trio.CancelScope()  # the wait for the relay's close frame
        self._close_patience: float | None = None  # set when the close handshake begins
        self._upgrade_done = trio.Event()
        self._upgrade_error: BaseException | None = None
        self._close_done = trio.Event()  # the close handshake is over: the task may end
        self.reader_done = False  # the task is over: nothing more will be read
        self._pings: set[trio.CancelScope] = set()

    @property
    def connection(self) -> WebSocketConnection:
        assert self._connection is not None, "the upgrade is not done"
        return self._connection

    async def run(self) -> None:
        """The session's task: upgrade, then keep trio-websocket's reader running until the
        channel closes. Never raises but cancellations (and KeyboardInterrupt).

        The stream is this task's to close until the upgrade is done, then the channel's
        (its ``aclose``), unless the reader fails: then it is closed here at once.
        """
        close_stream = True
        try:
            with self._task_scope:
                try:
                    async with trio.open_nursery() as nursery:
                        self._connection = await self._upgrade(nursery)
                        close_stream = False
                        self._upgrade_done.set()
                        await self._close_done.wait()
                        nursery.cancel_scope.cancel()  # its reader, if it still runs
                except BaseException as exc:
                    errors, rest = _split(exc)
                    if not self._upgrade_done.is_set():
                        self._upgrade_error = (
                            _upgrade_failure(errors)
                            if errors
                            else UpgradeFailed("the pool closed during the WebSocket upgrade")
                        )
                    elif errors:
                        close_stream = True
                        closing = self._close_done.is_set() or self.connection.closed is not None
                        logger.log(
                            logging.DEBUG if closing else logging.WARNING,
                            "WebSocket reader for %s failed: %r",
                            self.endpoint,
                            errors[0],
                        )
                    # A cancellation belongs to whoever cancelled (the errors are told).
                    if rest is exc:
                        raise
                    if rest is not None:
                        raise rest from None
        finally:
            self.reader_done = True
            self._notice()
            try:
                if close_stream:
                    # Also: trio-websocket leaves its stream open after a refused upgrade.
                    await trio.aclose_forcefully(self.frames)
            finally:
                self._upgrade_done.set()  # (a failed upgrade is told once this task is over)

    async def wait_upgraded(self) -> None:
        """Wait for the upgrade to complete (`run` must have been started).

        Raises:
            UpgradeFailed: The relay refused the upgrade, answered something else, or
                closed the connection (or the WebSocket) first; or the pool closed.
        """
        try:
            await self._upgrade_done.wait()
        except BaseException:
            self._task_scope.cancel()  # the connect gave up: so does the upgrade
            raise
        if self._upgrade_error is not None:
            self._task_scope.cancel()
            raise self._upgrade_error

    async def _upgrade(self, nursery: trio.Nursery) -> WebSocketConnection:
        endpoint, config = self.endpoint, self._config
        assert endpoint.websocket_path is not None
        began = trio.current_time()
        connection: WebSocketConnection | None = None
        with self._upgrading:  # cancelled if the stream ends first: no answer will come
            connection = await wrap_client_stream(
                nursery,
                # Any trio.abc.Stream will do, as documented; the annotation is narrower.
                self.frames,  # type: ignore[arg-type]
                endpoint.host_header,
                endpoint.websocket_path,
                subprotocols=config.websocket_subprotocols,
                extra_headers=config.websocket_header_pairs(),
                max_message_size=config.websocket_max_message_size,
            )
        if connection is None or self.frames.ended:
            raise UpgradeFailed("the relay closed the connection during the WebSocket upgrade")
        if connection.closed is not None:  # the close came with the upgrade's answer
            raise UpgradeFailed(
                "the relay closed the WebSocket right after the upgrade"
                f" ({_describe_close(connection.closed)})"
            )
        self.upgrade_seconds = trio.current_time() - began
        return connection

    async def ping(self) -> bool:
        """Ping, and wait for the pong: False if the relay closed the WebSocket, or the
        connection ended, first.

        Raises:
            trio_websocket.ConnectionClosed: The WebSocket was closed already.
        """
        frames = self.frames
        if frames.ended or frames.close_received or self.reader_done:
            await trio.lowlevel.checkpoint()
            return False
        with trio.CancelScope() as waiting:
            self._pings.add(waiting)
            try:
                await self.connection.ping()
            finally:
                self._pings.discard(waiting)
        return not waiting.cancelled_caught

    async def close(self, *, patience: float) -> None:
        """The close handshake: our close frame (unless the WebSocket is closing already),
        the relay's within ``patience`` of ours, then a TLS close_notify. Bounded by the
        caller's deadline and by ``shutdown_timeout``; forceful if cancelled."""
        self._close_patience = patience
        # Its reader must see the relay's close frame, even if the pool is exiting.
        self._task_scope.shield = True
        try:
            with trio.move_on_after(self._config.shutdown_timeout):
                with self._close_handshake:
                    # trio-websocket's close: the frame, the wait, then its stream's aclose.
                    await self.connection.aclose()
                await self.frames.aclose()  # (left open when the relay closed first)
        except BaseException:
            await trio.aclose_forcefully(self.frames)
            raise
        finally:
            self._close_done.set()

    def _notice(self) -> None:
        """The stream ended, the relay's close frame came, ours went out (the FrameWatch
        tells), or the reader is done: wake whoever waits for what will not come."""
        frames = self.frames
        if frames.ended or self.reader_done:  # nothing more will be read
            self._upgrading.cancel()
            self._close_handshake.cancel()
        if frames.ended or self.reader_done or frames.close_received:
            for waiting in self._pings:
                waiting.cancel()  # no pong will come
        if frames.close_sent and self._close_patience is not None:
            deadline = trio.current_time() + self._close_patience
            self._close_handshake.deadline = min(self._close_handshake.deadline, deadline)


async def start_session(
    nursery: trio.Nursery, ssl_stream: trio.SSLStream[Any], endpoint: Endpoint, config: PoolConfig
) -> Session:
    """Run the WebSocket upgrade over ``ssl_stream``, in a task started in ``nursery`` (the
    pool's: its exit cuts the upgrade short). Cancelling this call cancels the upgrade.

    Raises:
        UpgradeFailed: The relay refused the upgrade, answered something else, or closed
            the connection (or the WebSocket) first; or the pool is closing.
    """
    if nursery.cancel_scope.cancel_called:  # the pool is exiting: no new task there
        raise UpgradeFailed("the pool closed before the WebSocket upgrade")
    session = Session(ssl_stream, endpoint, config)
    nursery.start_soon(session.run, name=f"WebSocket reader for {endpoint}")
    await session.wait_upgraded()
    return session


# RFC 6455 5.2: the first byte of a frame holds FIN and the opcode.


def _describe_close(reason: CloseReason) -> str:
    return f"{reason.code} {reason.name}" + (f": {reason.reason}" if reason.reason else "")


def _split(exc: BaseException) -> tuple[list[Exception], BaseException | None]:
    """The errors ``exc`` carries (out of their groups), and what else (cancellations)."""
    if isinstance(exc, BaseExceptionGroup):
        errors, rest = exc.split(Exception)
        return (list(_leaves(errors)) if errors is not None else []), rest
    if isinstance(exc, Exception):
        return [exc], None
    return [], exc


def _leaves(group: BaseExceptionGroup[Exception]) -> Iterator[Exception]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _upgrade_failure(errors: list[Exception]) -> Exception:
    """What the errors of a failed upgrade amount to: an `UpgradeFailed` (its cause the
    relay's answer), or a bug (ours or trio-websocket's), raised as itself."""
    failures = [_as_upgrade_failure(error) for error in errors]
    for error, failure in zip(errors, failures, strict=True):
        if failure is None:
            return error  # a bug comes out, whatever else went wrong
    return next(failure for failure in failures if failure is not None)


def _as_upgrade_failure(error: Exception) -> UpgradeFailed | None:
    if isinstance(error, UpgradeFailed):
        return error
    if isinstance(error, ConnectionRejected):
        failure = UpgradeFailed(f"WebSocket upgrade refused: HTTP {error.status_code}")
        failure.__cause__ = error
        return failure
    garbled = _garbled_answer(error)
    if garbled is not None:
        failure = UpgradeFailed(
            f"WebSocket upgrade failed: not a WebSocket upgrade answer ({garbled})"
        )
        failure.__cause__ = garbled
        return failure
    return None


def _garbled_answer(error: BaseException) -> RemoteProtocolError | None:
    """The relay's unreadable answer behind ``error``: wsproto's `RemoteProtocolError`, or
    the one being handled when trio-websocket failed to answer it (wsproto or h11 then
    raise a `LocalProtocolError`, whose message may quote our own request: not shown)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RemoteProtocolError):
            return seen
        seen = seen.__context__
    return None
