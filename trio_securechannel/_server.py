"""The metrics server: a small ASGI app served by hypercorn's trio worker.

Routes (GET or HEAD; ``/events`` is a WebSocket):

- ``/metrics``: the pool's metrics in the Prometheus text format;
- ``/status``: `SecureChannelPool.status` as JSON;
- ``/healthz``: 200 while the pool can hand out channels, 503 while it is closed or its
  breaker is open; no details and no token, for load balancers and orchestrators;
- ``/events``: a live stream of JSON events (channels opened and closed, breaker
  transitions) and a status snapshot every few seconds.

With ``metrics_auth_token`` set, all but ``/healthz`` require ``X-Auth-Token: <token>`` or
``Authorization: Bearer <token>``, compared in constant time; a missing or wrong token gets
the same 401. The token is never logged and never sent back.

Hostile or broken clients cannot hold the server, nor the pool's exit:

- at most ``metrics_max_connections`` connections at once (``/events`` listeners too): when
  full, the oldest idle one is closed to make room, or, none being idle, the new one is
  closed at once; so the port never eats the file descriptors relay traffic needs;
- a client silent for `READ_TIMEOUT` is dropped; ``/events`` listeners are pinged twice per
  `READ_TIMEOUT`, so the ones that answer stay and the ones that stop answering go;
- a client that takes none of our bytes for `WRITE_TIMEOUT` is dropped (reset);
- when the pool closes, the server stops accepting, lets open exchanges finish for up to
  `GRACE` (at most ``shutdown_timeout``), then resets whatever is left.

Hypercorn's trio worker does the HTTP and WebSocket work, one `TCPServer` per connection;
the accept loop, the connection table and the shutdown are ours, because hypercorn writes
in shielded scopes: no cancellation ends a write to a client that stopped reading, only
closing its socket does.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast, final

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Event as ProtocolEvent
from hypercorn.events import Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ._breaker import BreakerState

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from ._config import PoolConfig
    from ._pool import SecureChannelPool


Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ALLOW: Final = b"GET, HEAD"
#: Seconds between status snapshots on ``/events``.
STATUS_EVERY: Final = 5.0
#: Seconds a client may stay silent before the server drops it: mid-request (read) and
#: between requests (keep-alive). Hypercorn closes a connection whose read timed out once
#: its keep-alive timer runs out too.
READ_TIMEOUT = 5.0
KEEP_ALIVE_TIMEOUT = 5.0
#: Seconds a client may take to accept any of a response's next 64 KiB: past that it is
#: reset. (A client that stops reading would otherwise hold a task and a socket forever.)
WRITE_TIMEOUT = 10.0
#: Seconds the server may take to finish open exchanges when the pool closes (at most the
#: pool's ``shutdown_timeout``); then what is left is reset.
GRACE: Final = 1.0
#: Request headers beyond this many bytes get a 431 (hypercorn bounds what it buffers for
#: a request still arriving; this bounds one that arrived whole).
MAX_HEADER_BYTES: Final = 8 * 1024
_UNAUTHORIZED_HEADERS: Final = [(b"www-authenticate", b'Bearer realm="trio_securechannel"')]
#: Writes are timed in pieces this big: a slow client that reads is never cut off.
_WRITE_PIECE: Final = 64 * 1024
#: Out of descriptors (or memory) to accept with: wait this long and try again, as
#: `trio.serve_listeners` does.
_ACCEPT_PAUSE: Final = 0.1
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
#: SO_LINGER on, for 0 s: close() resets the connection and discards unsent data.
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)

logger = logging.getLogger("trio_securechannel.metrics")


@final
class MetricsApp:
    """The ASGI application behind the metrics server of one pool."""

    def __init__(self, pool: SecureChannelPool) -> None:
        self._pool = pool
        token = pool.config.metrics_auth_token
        self._token = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        matched = False
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                value = value[7:].strip()
            elif name != b"x-auth-token":
                continue
            # Every credential offered is compared in full: no early exit to time.
            matched |= hmac.compare_digest(value, self._token)
        return matched

    async def _http(self, scope: Scope, send: Send) -> None:
        path = scope["path"]
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            await _respond(send, 431, b"request headers too large\n")
        elif path not in ("/metrics", "/status", "/healthz", "/events"):
            await _respond(send, 404, b"not found\n")
        elif scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", [(b"allow", ALLOW)])
        elif path != "/healthz" and not self._authorized(scope):
            await _respond(send, 401, b"unauthorized\n", _UNAUTHORIZED_HEADERS)
        elif path == "/metrics":
            await _respond(send, 200, self._pool.metrics_text(), content_type=CONTENT_TYPE_LATEST,
                           head=scope["method"] == "HEAD")  # fmt: skip
        elif path == "/status":
            body = json.dumps(self._pool.status()).encode()
            await _respond(send, 200, body, content_type="application/json",
                           head=scope["method"] == "HEAD")  # fmt: skip
        elif path == "/healthz":
            pool = self._pool
            serving = not pool.closed and pool.breaker_state is not BreakerState.OPEN
            await _respond(send, 200 if serving else 503, b"ok\n" if serving else b"unavailable\n",
                           head=scope["method"] == "HEAD")  # fmt: skip
        else:  # /events over plain HTTP
            await _respond(send, 426, b"use a WebSocket\n", [(b"upgrade", b"websocket")])

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if scope["path"] != "/events":
            await _deny(send, 404, b"not found\n")
            return
        if not self._authorized(scope):
            await _deny(send, 401, b"unauthorized\n", _UNAUTHORIZED_HEADERS)
            return
        await send({"type": "websocket.accept"})
        with self._pool.events() as events:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                await self._stream_events(events, send)
                nursery.cancel_scope.cancel()

    async def _stream_events(self, events: Any, send: Send) -> None:
        pool = self._pool
        next_status = trio.current_time()
        while True:
            with trio.move_on_at(next_status):
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:  # the pool is closing: say goodbye
                    await send({"type": "websocket.close", "code": 1001})
                    return
                await send({"type": "websocket.send", "text": json.dumps(event)})
                continue
            await send(
                {
                    "type": "websocket.send",
                    "text": json.dumps({"type": "status", "status": pool.status()}),
                }
            )
            next_status = trio.current_time() + STATUS_EVERY


@final
class MetricsServer:
    """Serves one pool's figures: started before the pool is handed out, stopped after it
    has shut down (so ``/events`` clients see the stream end), within a bounded time
    whatever its clients do."""

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._stop = trio.Event()
        self._stopped: trio.Event | None = None
        self._connections = _Connections(config.metrics_max_connections)
        self._grace = min(GRACE, config.shutdown_timeout)
        self.address: tuple[str, int] | None = None  # once started

    @property
    def open_connections(self) -> int:
        """Connections the server holds open (at most ``metrics_max_connections``)."""
        return len(self._connections)

    async def start(self, nursery: trio.Nursery, pool: SecureChannelPool) -> tuple[str, int]:
        """Serve ``pool``'s figures in ``nursery``; return the bound ``(host, port)``.

        Raises:
            OSError: The address cannot be resolved or bound, naming it.
        """
        listener = await _bind(self._config.metrics_host, self._config.metrics_port)
        self._stopped = trio.Event()
        self.address = await nursery.start(self._serve, listener, pool)
        logger.info("metrics server listening on http://%s", _where(*self.address))
        return self.address

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop accepting, let open exchanges finish (for up to `GRACE`, at most
        ``shutdown_timeout``, at most ``grace``), reset the connections left, and return."""
        if grace is not None:
            self._grace = max(0.0, min(self._grace, grace))
        self._stop.set()
        if self._stopped is not None:
            # `_serve` ends by itself once the grace is over; the bound is a backstop.
            with trio.CancelScope(shield=True), trio.move_on_after(self._grace + 1):
                await self._stopped.wait()

    async def _serve(
        self,
        listener: socket.socket,
        pool: SecureChannelPool,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self._stopped is not None
        try:
            with listener:
                config = _config()
                # The app speaks ASGI in plain dicts; hypercorn's typing wants its TypedDicts.
                app = ASGIWrapper(cast("ASGIFramework", MetricsApp(pool)))
                context = WorkerContext(None)
                listener.listen(config.backlog)
                host, port = listener.getsockname()[:2]
                accepting = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
                async with trio.open_nursery() as handlers:
                    try:
                        async with trio.open_nursery() as acceptor:
                            handle = partial(self._handle, app, config, context)
                            acceptor.start_soon(self._accept, accepting, handlers, handle)
                            task_status.started((host, port))
                            await self._stop.wait()
                            acceptor.cancel_scope.cancel()  # (closes the listener)
                        # No new request on open connections; idle ones close at once.
                        await context.terminated.set()
                        with trio.move_on_after(self._grace):
                            await self._connections.wait_empty()
                    finally:
                        # Even (above all) the ones stuck in a shielded write.
                        self._connections.close_all(reset=True)
                        handlers.cancel_scope.cancel()
        finally:
            self._stopped.set()
            logger.debug("metrics server stopped")

    async def _accept(
        self,
        listener: trio.SocketListener,
        handlers: trio.Nursery,
        handle: Callable[[_Connection], Awaitable[None]],
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    logger.warning(
                        "metrics server cannot accept (%s); retrying in %s s",
                        os.strerror(exc.errno),
                        _ACCEPT_PAUSE,
                    )
                    await trio.sleep(_ACCEPT_PAUSE)
                    continue
                connection = self._connections.admit(stream)
                if connection is None:  # full of busy ones: refused at once, not queued
                    logger.debug("metrics server full: connection refused")
                    stream.socket.close()
                    continue
                handlers.start_soon(handle, connection)

    async def _handle(
        self, app: ASGIWrapper, config: Config, context: WorkerContext, connection: _Connection
    ) -> None:
        try:
            await _Handler(app, config, context, connection, self._connections).run()
        except Exception:
            # One connection's trouble must not take the server, and the pool, down.
            logger.exception("metrics server: a connection failed")
        finally:
            self._connections.close(connection)


@final
class _Connection:
    """One accepted connection, as the table sees it."""

    __slots__ = ("idle", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        #: No request in hand: hypercorn says when one starts and when it is answered.
        self.idle = True


@final
class _Connections:
    """The server's open connections, oldest first, at most ``cap`` of them."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._open: dict[_Connection, None] = {}  # (ordered: oldest first)
        self._empty = trio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, stream: trio.SocketStream) -> _Connection | None:
        """Take ``stream`` in, closing the oldest idle connection if full; None if every
        connection is busy (the caller closes ``stream``)."""
        if len(self._open) >= self._cap:
            oldest_idle = next((c for c in self._open if c.idle), None)
            if oldest_idle is None:
                return None
            logger.debug("metrics server full: oldest idle connection closed")
            self.close(oldest_idle)
        connection = _Connection(stream)
        self._open[connection] = None
        if self._empty.is_set():
            self._empty = trio.Event()
        return connection

    def close(self, connection: _Connection, *, reset: bool = False) -> None:
        """Close ``connection``'s socket now (idempotent). Whatever task waits on it wakes
        up (trio's `notify_closing`), in a shielded scope or not. ``reset``: discard what
        is unsent and send an RST, for a peer that does not read."""
        sock = connection.stream.socket
        if reset:
            with suppress(OSError):  # (closed already)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        sock.close()
        self._open.pop(connection, None)
        if not self._open:
            self._empty.set()

    def close_all(self, *, reset: bool = False) -> None:
        for connection in list(self._open):
            self.close(connection, reset=reset)

    async def wait_empty(self) -> None:
        await self._empty.wait()


@final
class _Guarded(trio.abc.HalfCloseableStream):
    """A connection's stream as hypercorn sees it, with a deadline on its writes.

    Hypercorn writes in a shielded scope, so a client that stops reading would hold the
    write forever; this deadline is inside the shield. Past it the connection is reset and
    the write fails as one to a client that went away would."""

    def __init__(self, connection: _Connection, connections: _Connections) -> None:
        self._connection = connection
        self._connections = connections
        self._stream = connection.stream
        self.socket = connection.stream.socket  # hypercorn reads the addresses off it

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            for start in range(0, max(len(view), 1), _WRITE_PIECE):
                with trio.move_on_after(WRITE_TIMEOUT) as waiting:
                    await self._stream.send_all(view[start : start + _WRITE_PIECE])
                if waiting.cancelled_caught:
                    logger.debug("metrics client takes no data: connection reset")
                    self._connections.close(self._connection, reset=True)
                    raise trio.BrokenResourceError("the client stopped reading")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        # Out of the table at once: hypercorn's tasks may linger a while (its pinger sleeps).
        self._connections.close(self._connection)
        await trio.lowlevel.checkpoint()


@final
class _Handler(TCPServer):
    """Hypercorn's handler of one connection, telling the table when it is idle."""

    def __init__(
        self,
        app: ASGIWrapper,
        config: Config,
        context: WorkerContext,
        connection: _Connection,
        connections: _Connections,
    ) -> None:
        # Without `do_handshake`, hypercorn takes the stream for plain TCP.
        stream = cast("trio.SSLStream[trio.SocketStream]", _Guarded(connection, connections))
        super().__init__(app, config, context, {}, stream)
        self._connection = connection
        self._connections = connections

    async def protocol_send(self, event: ProtocolEvent) -> None:
        if isinstance(getattr(getattr(self, "protocol", None), "protocol", None), H2Protocol):
            # No HTTP/2 here (a preface or an h2c upgrade): its flow control can hold a
            # connection busy for ever with nothing written and pings to look alive.
            self._connections.close(self._connection, reset=True)
            return
        if isinstance(event, Updated):
            self._connection.idle = event.idle
        await super().protocol_send(event)


async def _bind(host: str, port: int | None) -> socket.socket:
    """Bind the server's socket ourselves: a clean, named error, and nothing left open."""
    where = _where(host, port)
    try:
        family, kind, proto, _, address = (
            await trio.socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )[0]
        listener = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(
            exc.errno, f"metrics server cannot listen on {where}: {exc.strerror or exc}"
        ) from exc
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        listener.close()
        raise OSError(
            exc.errno, f"metrics server cannot listen on {where}: {exc.strerror}"
        ) from exc
    return listener


def _where(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _config() -> Config:
    # Hypercorn logs nothing of its own here: its "Running on ... (CTRL + C to quit)" comes
    # from its `serve`, which we do not run (the accept loop is ours); it has no access log;
    # and what it would say as a server (an app error) goes to our logger, which an
    # application without logging configured never hears (the NullHandler in __init__).
    config = Config()
    config.accesslog = None  # request lines and headers stay out of the logs
    config.errorlog = logger
    config.include_server_header = False
    # A client that is slow, or sends too much, cannot hold the server.
    config.h11_max_incomplete_size = MAX_HEADER_BYTES  # request line plus headers
    config.read_timeout = READ_TIMEOUT  # type: ignore[assignment]
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.websocket_max_message_size = 4 * 1024  # /events only sends
    # /events clients send nothing but pongs: pinged twice per read timeout, a listener
    # that answers is never silent for that long; one that stops answering is dropped.
    config.websocket_ping_interval = READ_TIMEOUT / 2
    return config


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _deny(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Refuse a WebSocket handshake with a plain HTTP response."""
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *(headers or [])],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass  # /events ignores what clients send
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
