"""Pooled channels: what every kind shares (`Channel`), and `SecureChannel`, a TLS stream.

A channel is one TLS connection to a relay, lent out by a pool. `Channel` keeps its books
(why it may not be lent again, its errors, round trips and byte counts); `SecureChannel`
is a `trio.abc.Stream` over the `trio.SSLStream`, and ``_websocket.WebSocketChannel``
carries WebSocket messages over one.
"""

from __future__ import annotations

import abc
import itertools
import logging
import math
import select
import ssl
import statistics
import warnings
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, final

import trio

from ._endpoint import Endpoint
from ._errors import ProtocolError, RequestTimeout
from ._latency import RotatingHistogram
from ._tls_buffers import TlsBuffers

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._breaker import Trial

T = TypeVar("T")

#: No deadline (a module constant: compared on every send and receive).
NO_DEADLINE = math.inf

_channel_ids = itertools.count(1)

logger = logging.getLogger("trio_securechannel")

#: The reasons `Channel.retire_when_returned` counts as given (``closed_by_reason``, the
#: ``reason`` label, ``/events``): the pool's own close reasons except ``"error"`` (which
#: would claim an error nobody counted, and mark the stream broken). Any other is counted as
#: `USER_REASON`, its text logged, so reasons made up per call never grow the label values.
RETIRE_REASONS = frozenset(
    {"user", "subscribed", "slow", "stale", "idle", "lifetime", "unanswered", "unread data",
     "unexpected data", "eof", "closed", "aborted", "cancelled", "shutdown"}
)  # fmt: skip
USER_REASON = "user"

#: How many of a channel's latest round trips `SecureChannel.recent_round_trip` looks at.
RECENT_ROUND_TRIPS = 8

#: Failures after which trio's stream is whole but we stopped reading it mid-message.
_OUR_OWN_FAILURES = frozenset(["too_big", "protocol", "dropped"])

#: The default bound on one line `SecureChannel.receive_line` accepts (``max_line_length``).
MAX_LINE_LENGTH = 1 << 20


class Channel(abc.ABC):
    """What every pooled channel has: its relay, its TLS stream, and its books.

    Attributes:
        endpoint: The relay this channel is connected to.
        id: A number unique within the process, for logs.
        opened_at: `trio.current_time()` when the handshake completed.
        handshake_seconds: How long the handshake took (after the TCP connect): TLS,
            and for a WebSocket channel the upgrade too.
        spent: Why the channel may not be lent again, or None while it may.
        errors: I/O errors seen on this channel, by kind (counted once per failure).
        round_trips: Latency from a send to the next receive that returns data, in a
            current and a previous window.
        bytes_sent: Application bytes sent.
        bytes_received: Application bytes received.
        unanswered: True when the last I/O was a send with no reply read since: such a
            channel is not pooled again when its block ends (the reply still on its way
            would reach the next user).
        deadline: While lent under a time limit, the `trio.current_time` by which its
            relay must have answered (`RequestTimeout` past it); ``math.inf`` otherwise.
        request_timeout: That limit, in seconds from the checkout (set with
            ``deadline``).
        trial: The circuit breaker's trial permit this channel is proving, if any: its
            first reply closes the breaker, its first failure reopens it.
    """

    def __init__(
        self,
        ssl_stream: trio.SSLStream[Any],
        endpoint: Endpoint,
        *,
        on_error: Callable[[Channel, str], None] | None = None,
        on_trial_answered: Callable[[Channel], None] | None = None,
        handshake_seconds: float = 0.0,
        tls_buffers: TlsBuffers | None = None,
    ) -> None:
        self._goodbye_started = False  # first, so __del__ works whatever happens next
        self._closed = False  # to its holder: aclose() was called, or the pool retired it
        self._stream = ssl_stream
        self._on_error = on_error  # told of each failure as it happens (the pool's breaker)
        self._on_trial_answered = on_trial_answered  # and of a trial's first reply
        # TLS's incoming buffer (None: only what SSLObject.pending shows), for the checkout.
        self._tls_buffers = tls_buffers
        self._tls_incoming = tls_buffers.incoming if tls_buffers is not None else None
        self.deadline = NO_DEADLINE
        self.request_timeout: float | None = None
        self.trial: Trial | None = None
        #: Why this channel may not be lent again ("error", "cancelled", "eof", "closed",
        #: "unexpected data", "slow", "stale"), or None while it may.
        self.spent: str | None = None
        self.endpoint = endpoint
        self.id = next(_channel_ids)
        # The run's clock, bound once: two reads per round trip, on the hot path.
        self._now = trio.lowlevel.current_clock().current_time
        self.opened_at = self._now()
        self.idle_since = self.opened_at
        self.handshake_seconds = handshake_seconds
        self.round_trips = RotatingHistogram(self.opened_at)
        self.round_trips_total = 0
        self.round_trips_reported = 0  # how many its relay has learned from
        self._latest_round_trips: deque[float] = deque(maxlen=RECENT_ROUND_TRIPS)
        # When the first send since the last reply began (None: nothing awaits a reply).
        self._awaiting_reply_since: float | None = None
        self.unanswered = False
        self.errors: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        # One poll object for the channel's life: the liveness probe at every checkout is
        # then a single poll() call, with nothing to allocate or register.
        # SSLObject.pending, looked up once: SSLStream forwards it through __getattr__.
        self._tls_pending: Callable[[], int] = ssl_stream.pending
        self._poller: select.poll | None = None
        self._polled_fd = -1
        transport = ssl_stream.transport_stream
        if isinstance(transport, trio.SocketStream) and hasattr(select, "poll"):
            self._socket = transport.socket
            self._polled_fd = self._socket.fileno()
            if self._polled_fd >= 0:
                self._poller = select.poll()
                self._poller.register(self._polled_fd, select.POLLIN)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.spent or "open"
        return f"<{type(self).__name__} #{self.id} to {self.endpoint} {state}>"

    def __del__(self) -> None:
        if not self._goodbye_started:
            warnings.warn(
                f"unclosed {self!r}: use it through a pool, or call aclose()",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    @property
    def ssl_stream(self) -> trio.SSLStream[Any]:
        """The `trio.SSLStream` underneath, for `~trio.SSLStream.getpeercert`, `cipher`, ..."""
        return self._stream

    def recent_round_trip(self) -> float | None:
        """The median of the last few round trips, in seconds (None before the first).

        Exact, unlike the histograms' bucketed percentiles: ``max_latency_ms`` compares it
        with its limit.
        """
        return statistics.median(self._latest_round_trips) if self._latest_round_trips else None

    @property
    def closed(self) -> bool:
        """True once `aclose` was called, or the pool retired the channel (its goodbye to
        the relay may still be under way in the pool's nursery)."""
        return self._closed

    @property
    def reusable(self) -> bool:
        """True while nothing has happened that forbids lending this channel again."""
        return self.spent is None

    def retire_when_returned(self, reason: str) -> None:
        """Let the current user finish, but never lend this channel again.

        Its close is counted under ``reason`` if that is one of the pool's own reasons
        (``"subscribed"``, ``"slow"``, ...), else under ``"user"``: the count's labels stay
        few, whatever the reasons. The text of such a reason is logged (DEBUG, logger
        ``trio_securechannel``).
        """
        if not (isinstance(reason, str) and reason in RETIRE_REASONS):
            if self.spent is None:
                logger.debug("%r to be retired when returned: %s", self, reason)
            reason = USER_REASON
        self._spend(reason)

    def report_to(
        self,
        on_error: Callable[[Channel, str], None] | None,
        on_trial_answered: Callable[[Channel], None] | None,
    ) -> None:
        """For the pool: from now on, tell ``on_error`` of each failure as it happens, and
        ``on_trial_answered`` of a trial's first reply."""
        self._on_error = on_error
        self._on_trial_answered = on_trial_answered

    def blame_relay(self) -> None:
        """Say the relay broke the protocol spoken over this channel (a reply that makes no
        sense): counted once as an error of kind ``"protocol"`` and as a failure for its
        circuit breaker; the channel is never lent again. Raise your own error after it.
        """
        self._fail("protocol")

    @property
    def buffered_bytes(self) -> int:
        """Bytes read from the relay and held for the next receive (half a line, or what
        came behind one). A channel given back with any is not pooled again."""
        return 0

    def _fail(self, kind: str, *, blame_relay: bool = True) -> None:
        # A stream breaks once; later calls re-raise the same state and count nothing.
        if self.spent != "error":
            self.errors[kind] += 1
            self.spent = "error"
            if blame_relay and self._on_error is not None:
                self._on_error(self, kind)

    def _spend(self, reason: str) -> None:
        if self.spent is None:
            self.spent = reason

    def _sent(self, started: float, size: int, *, message: bool = False) -> None:
        """Book a completed send that began at ``started``: it awaits a reply if it
        carried bytes, or was a message (even an empty one)."""
        self.bytes_sent += size
        if (size or message) and self._awaiting_reply_since is None:
            self._awaiting_reply_since = started
            self.unanswered = True

    def _received(self, size: int) -> None:
        """Book a receive that returned data: it answers the first unanswered send."""
        self.bytes_received += size
        if self._awaiting_reply_since is not None:
            elapsed = self._now() - self._awaiting_reply_since
            self.round_trips.observe(elapsed)
            self._latest_round_trips.append(elapsed)
            self.round_trips_total += 1
            self._awaiting_reply_since = None
            self.unanswered = False
            if self.trial is not None and self._on_trial_answered is not None:
                self._on_trial_answered(self)

    async def _by_deadline(self, operation: Awaitable[T]) -> T:
        """Await ``operation`` until `deadline`; past it, the relay has failed."""
        with trio.move_on_at(self.deadline):
            return await operation
        self._fail("timeout")
        raise RequestTimeout(str(self.endpoint), self.request_timeout or 0.0)

    def _unread_bytes(self) -> bool:
        """True if bytes (or end-of-file) wait in TLS or on the socket, unread."""
        if self._tls_pending():
            return True
        if self._poller is not None:
            if self._socket.fileno() != self._polled_fd:
                return True  # closed under us (the fd may already serve another socket)
            return bool(self._poller.poll(0))
        transport = self._stream.transport_stream
        if isinstance(transport, trio.SocketStream):  # no poll() here (Windows): select()
            return transport.socket.fileno() == -1 or transport.socket.is_readable()
        return False

    @abc.abstractmethod
    def has_pending_input(self) -> bool:
        """True if the relay sent something (data, a close) that nobody has read."""

    def settle(self) -> bool:
        """For the pool, on an idle channel: whether it is quiet, fit to lend.

        Like ``not has_pending_input()``, except that what only TLS itself needed to read
        (session tickets) is read here and does not count. Never call it on a channel in
        use: it may read from the connection.
        """
        return not self.has_pending_input()

    @abc.abstractmethod
    async def watch(self, window: float) -> None:
        """Watch a fresh spare for ``window`` seconds before it is pooled (see
        `SecureChannel`'s)."""

    def mark_closed(self) -> None:
        """Closed to whoever holds it, from now on: `closed` is True and its calls raise
        `trio.ClosedResourceError`. The goodbye to the relay comes with `aclose`.

        A pool calls this as a channel leaves its books, then says the goodbye in its own
        nursery, so that nobody waits on a slow relay to leave an ``async with`` block.
        """
        self._closed = True
        self._spend("closed")

    async def aclose(self) -> None:
        """Say goodbye to the relay and close the connection; forceful if cancelled.

        Idempotent, as `trio.abc.AsyncResource.aclose` requires.
        """
        if self._goodbye_started:
            await trio.lowlevel.checkpoint()
            return
        self._goodbye_started = True
        self.mark_closed()
        await self._goodbye()

    @abc.abstractmethod
    async def _goodbye(self) -> None:
        """The goodbye itself (a TLS close_notify, a WebSocket close frame), then the
        socket's close; forceful if cancelled."""

    async def _raise_closed(self) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("this channel was closed")


@final
class SecureChannel(Channel, trio.abc.Stream):
    """A TLS client connection to a relay, lent out by a pool.

    It is a `trio.abc.Stream`: `send_all`, `receive_some`, `wait_send_all_might_not_block`
    and an idempotent `aclose`. Two tasks sending (or receiving) at once get
    `trio.BusyResourceError`; after an I/O failure calls raise `trio.BrokenResourceError`,
    after `aclose` `trio.ClosedResourceError`.

    A channel that saw an error, a cancellation or end-of-file is never lent out again:
    its TLS state may be mid-record (trio#889) or its peer gone. `spent` says why.

    For a line protocol (newline-delimited JSON-RPC, as Electrum servers speak), use
    `send_line` and `receive_line`: each returns exactly one whole message, however the
    relay's bytes were cut into reads. With the raw `receive_some`, the rule is yours to
    keep: read each reply to its end before the block ends (the pool cannot know where a
    message ends; bytes that arrive after the block are found at the next checkout, but a
    reply still on its way could reach the next user).

    Attributes:
        max_line_length: The longest line `receive_line` accepts, in bytes (without its
            newline); the pool's ``max_line_length``.
        The others are `Channel`'s.
    """

    def __init__(
        self,
        ssl_stream: trio.SSLStream[Any],
        endpoint: Endpoint,
        *,
        max_line_length: int = MAX_LINE_LENGTH,
        **options: Any,
    ) -> None:
        super().__init__(ssl_stream, endpoint, **options)
        self.max_line_length = max_line_length
        self._reading = False  # receive_line is putting a line together
        # What was read off the connection and not yet taken: half a line, or the bytes
        # behind one. Never pooled with any (see `buffered_bytes`).
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        """Bytes read from the relay and held for the next receive (half a line, or what
        came behind one). A channel given back with any is not pooled again."""
        return len(self._buffer)

    async def send_line(self, line: bytes | bytearray | memoryview) -> None:
        """Send one line: ``line`` and a newline (``line`` itself must contain none).

        Raises:
            ValueError: ``line`` contains a newline (it would be two messages).
            TypeError: ``line`` is not bytes (encode text first).
            And those of `send_all`.
        """
        if isinstance(line, str):
            raise TypeError("send_line takes bytes; encode the text first")
        data = bytes(line)  # (a memoryview's `in` would compare ints)
        if b"\n" in data:
            raise ValueError("send_line: the line contains a newline (b'\\n'), it would be two")
        await self.send_all(data + b"\n")

    async def receive_line(self) -> bytes:
        """Receive one whole line from the relay: the bytes up to the next newline, without
        it; what came behind it waits for the next call.

        Raises:
            ProtocolError: The line is longer than `max_line_length` (the channel is
                discarded; counted as an error of kind ``"too_big"``).
            trio.BrokenResourceError: The relay closed the connection before a whole line
                came (held against it when a request was unanswered or a line half sent),
                or the channel failed before.
            And those of `receive_some`.
        """
        buffer = self._buffer
        if not buffer and not self._reading:  # the common case: one read, one whole reply
            data = await self._receive(None)
            end = data.find(b"\n")
            if 0 <= end == len(data) - 1 and end <= self.max_line_length:
                return bytes(data[:end])
            if not data:
                raise self._ended_mid_line()
            buffer += data
        else:
            self._check_receivable()
            await trio.lowlevel.checkpoint()  # (it may return without reading)
        self._reading = True  # a line is being put together: no other reader may take part
        try:
            return await self._assemble_line()
        finally:
            self._reading = False

    async def _assemble_line(self) -> bytes:
        buffer, limit = self._buffer, self.max_line_length
        scanned = 0
        while True:
            end = buffer.find(b"\n", scanned)
            if end >= 0:
                if end > limit:
                    self._line_too_long()
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                return line
            if len(buffer) > limit:
                self._line_too_long()
            scanned = len(buffer)
            data = await self._receive(None)
            if not data:
                raise self._ended_mid_line()
            buffer += data

    def _check_receivable(self) -> None:
        """Before taking buffered bytes: the channel is open, whole, and nobody else is
        putting a line together from them."""
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")
        if self.spent == "error":
            raise trio.BrokenResourceError(f"this channel to {self.endpoint} failed before")
        if self._reading:
            raise trio.BusyResourceError("another task is already receiving on this channel")

    def _line_too_long(self) -> NoReturn:
        self._buffer.clear()
        # Counted, but not as a failure of the relay: the limit is ours, and a healthy
        # relay's long reply must not open its breaker for everyone else.
        self._fail("too_big", blame_relay=False)
        raise ProtocolError(
            str(self.endpoint),
            f"a line longer than max_line_length={self.max_line_length} bytes",
        )

    def _ended_mid_line(self) -> trio.BrokenResourceError:
        if self._buffer:
            self._buffer.clear()
            self._fail("dropped")  # it hung up halfway through a message
            return trio.BrokenResourceError(f"{self.endpoint} closed the connection mid-line")
        return trio.BrokenResourceError(f"{self.endpoint} closed the connection")

    def _broken(self, cause: BaseException | None) -> trio.BrokenResourceError:
        """What broke, for trio's TLS stream's own error, which says nothing: it is raised
        bare after a TLS error (its cause) and on every call after any failure."""
        if cause is None:
            return trio.BrokenResourceError(f"this channel to {self.endpoint} failed before")
        if isinstance(cause, ssl.SSLEOFError):
            return trio.BrokenResourceError(
                f"{self.endpoint} closed the connection without ending TLS (no close_notify):"
                " what it sent last may be cut short"
            )
        if isinstance(cause, ssl.SSLError) and cause.reason:
            what = cause.reason.lower().replace("_", " ")
            return trio.BrokenResourceError(f"TLS error on the channel to {self.endpoint}: {what}")
        return trio.BrokenResourceError(
            f"the channel to {self.endpoint} broke: {type(cause).__name__}: {cause}"
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``. See `trio.abc.SendStream.send_all`."""
        if self._closed:
            await self._raise_closed()
        started = self._now()
        try:
            if self.deadline == NO_DEADLINE:
                await self._stream.send_all(data)
            else:
                await self._by_deadline(self._stream.send_all(data))
        except trio.BusyResourceError:
            raise  # the other sender's business; this stream is untouched
        except trio.BrokenResourceError as exc:
            self._fail("io")
            if str(exc):
                raise
            raise self._broken(exc.__cause__) from exc.__cause__
        except BaseException:
            # Cancelled or closed mid-write: a partial TLS record may be on the wire.
            self._spend("cancelled")
            raise
        self._sent(started, len(data) if isinstance(data, bytes) else memoryview(data).nbytes)

    async def wait_send_all_might_not_block(self) -> None:
        """See `trio.abc.SendStream.wait_send_all_might_not_block`."""
        if self._closed:
            await self._raise_closed()
        try:
            if self.deadline == NO_DEADLINE:
                await self._stream.wait_send_all_might_not_block()
            else:
                await self._by_deadline(self._stream.wait_send_all_might_not_block())
        except trio.BrokenResourceError as exc:
            self._fail("io")
            if str(exc):
                raise
            raise self._broken(exc.__cause__) from exc.__cause__

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive and decrypt some data; ``b""`` at end-of-file.

        What `receive_line` read behind a line comes first. See
        `trio.abc.ReceiveStream.receive_some`.
        """
        buffer = self._buffer
        if buffer or self._reading:
            self._check_receivable()
            if max_bytes is not None and max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            await trio.lowlevel.checkpoint()
            size = len(buffer) if max_bytes is None else min(max_bytes, len(buffer))
            data = bytes(buffer[:size])
            del buffer[:size]
            return data
        return await self._receive(max_bytes)

    async def _receive(self, max_bytes: int | None) -> bytes | bytearray:
        if self._closed:
            await self._raise_closed()
        if self.spent == "error" and self.errors.keys() & _OUR_OWN_FAILURES:
            # trio's stream is whole, but we gave up on it mid-message: nothing read after
            # that is a message.
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError(f"this channel to {self.endpoint} failed before")
        try:
            if self.deadline == NO_DEADLINE:
                data = await self._stream.receive_some(max_bytes)
            else:
                data = await self._by_deadline(self._stream.receive_some(max_bytes))
        except trio.BusyResourceError:
            raise
        except trio.BrokenResourceError as exc:
            self._fail("io")
            if str(exc):
                raise
            raise self._broken(exc.__cause__) from exc.__cause__
        except BaseException:
            self._spend("cancelled")  # the reply may be half read
            raise
        if data:
            self._received(len(data))
        elif self.unanswered:
            self._fail("dropped")  # the relay hung up on a request
        else:
            self._spend("eof")  # the peer closed its side
        return data

    async def _goodbye(self) -> None:
        """A TLS close_notify, then the socket's close; forceful if cancelled."""
        await self._stream.aclose()

    def has_pending_input(self) -> bool:
        """True if the peer sent something (data, end-of-file) that nobody has read.

        Looks at every place bytes can wait: decrypted in TLS, still encrypted in TLS's
        buffer (a record read off the socket behind the last reply), and on the socket,
        with one ``poll()``. Streams not backed by a socket (custom transports) report
        only what TLS holds. TLS 1.3 session tickets count too (see `settle`).
        """
        if self._closed or self._buffer or self._tls_pending():
            return True
        incoming = self._tls_incoming
        if incoming is not None and incoming.pending:
            return True
        return self._unread_bytes()

    def settle(self) -> bool:
        """For the pool, on an idle channel: whether it is quiet, fit to lend.

        When bytes wait unread, they are settled (see `TlsBuffers.settle`): TLS session
        tickets, which relays send whenever they like, are processed and do not count;
        anything else does, and leaves the channel spent (``"stale"``: settling may have
        consumed part of it). When nothing waits, this costs one ``poll()``: cheap enough
        for every checkout. Never call it on a channel in use: it reads the connection.
        """
        if self._closed or self._tls_pending():
            return False
        incoming, buffers = self._tls_incoming, self._tls_buffers
        if self._poller is not None:  # (`_unread_bytes`, inlined: this is every checkout)
            if self._socket.fileno() != self._polled_fd:
                return False  # closed under us (the fd may already serve another socket)
            if not self._poller.poll(0) and (incoming is None or not incoming.pending):
                return True
            quiet = buffers is not None and buffers.settle(self._polled_fd)
        elif buffers is not None and incoming is not None and incoming.pending:
            quiet = buffers.settle(None)
        else:
            quiet = not self._unread_bytes()
        if not quiet:
            self._spend("stale")
        return quiet

    async def watch(self, window: float) -> None:
        """Watch a fresh spare for ``window`` seconds before it is pooled.

        A relay whose service behind TLS is down (a TLS terminator whose backend is gone)
        completes the handshake and hangs up at once: such a channel fails (``"dropped"``,
        held against the relay). One that sends data unasked right away is spent
        (``"unexpected data"``). TLS 1.3 session tickets that come meanwhile are read.
        """
        with trio.move_on_after(window):
            # The raw stream, not our receive_some: a cancelled read here is expected and
            # harmless (no handshake is running), so it must not mark the channel spent.
            try:
                data = await self._stream.receive_some()
            except trio.BrokenResourceError:
                data = b""  # a reset
            if data:
                self._spend("unexpected data")
            else:
                self._fail("dropped")
