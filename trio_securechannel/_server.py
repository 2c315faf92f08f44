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
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast, final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
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
#: Seconds the server may take to finish open exchanges when the pool closes.
GRACE: Final = 1.0
#: Request headers beyond this many bytes get a 431 (hypercorn bounds what it buffers for
#: a request still arriving; this bounds one that arrived whole).
MAX_HEADER_BYTES: Final = 8 * 1024
_UNAUTHORIZED_HEADERS: Final = [(b"www-authenticate", b'Bearer realm="trio_securechannel"')]

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
    """Runs hypercorn for one pool: started before the pool is handed out, stopped after it
    has shut down, gracefully, so ``/events`` clients see the stream end."""

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._stop = trio.Event()
        self._stopped: trio.Event | None = None
        self.address: tuple[str, int] | None = None  # once started

    async def start(self, nursery: trio.Nursery, pool: SecureChannelPool) -> tuple[str, int]:
        """Serve ``pool``'s figures in ``nursery``; return the bound ``(host, port)``.

        Raises:
            OSError: The address cannot be resolved or bound, naming it.
        """
        listener = await _bind(self._config.metrics_host, self._config.metrics_port)
        self._stopped = trio.Event()
        self.address = await nursery.start(self._serve, listener, pool)
        return self.address

    async def stop(self) -> None:
        """Stop accepting, let open exchanges finish (briefly), and return."""
        self._stop.set()
        if self._stopped is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(GRACE):
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
            async with trio.open_nursery() as nursery:
                # The app speaks ASGI in plain dicts; hypercorn's typing wants its TypedDicts.
                app = cast("ASGIFramework", MetricsApp(pool))
                config = _config(f"fd://{listener.detach()}")  # hypercorn owns it from here
                run = partial(serve, app, config, shutdown_trigger=self._stop.wait)
                binds: list[str] = await nursery.start(run)
                host, _, port = binds[0].removeprefix("http://").rpartition(":")
                task_status.started((host.strip("[]"), int(port)))
        finally:
            self._stopped.set()


async def _bind(host: str, port: int | None) -> socket.socket:
    """Bind the server's socket ourselves: a clean, named error, and nothing left open."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
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


def _config(bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None  # request lines and headers stay out of the logs
    config.errorlog = logger
    config.include_server_header = False
    # A client that is slow, or sends too much, cannot hold the server.
    config.h11_max_incomplete_size = MAX_HEADER_BYTES  # request line plus headers
    config.read_timeout = READ_TIMEOUT  # type: ignore[assignment]
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.websocket_max_message_size = 4 * 1024  # /events only sends
    config.graceful_timeout = GRACE
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
