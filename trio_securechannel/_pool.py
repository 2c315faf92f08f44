"""`open_pool` and `SecureChannelPool`: one or several relays behind one checkout.

The pool is the front door: it parses and validates, owns the nursery, and lends through a
`Router` per kind of channel; each relay's planner decides, and its `Relay` acts (see
"How a checkout works" in docs/pooling.rst).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, final

import sniffio
import trio
from prometheus_client import CollectorRegistry, generate_latest

from ._breaker import BreakerEvent, BreakerState
from ._channel import Channel, SecureChannel
from ._config import PoolConfig, PoolOptions, check_seconds
from ._endpoint import Endpoint, Target
from ._events import EventBus, EventStream
from ._lease import Lease
from ._metrics import PoolCollector
from ._pinning import pin_address
from ._relay import Relay
from ._routing import Router
from ._server import MetricsServer
from ._snapshot import PoolSnapshot
from ._status import PoolStatus, pool_status, serving_state
from ._tls import load_root_store
from ._websocket import WebSocketChannel

if TYPE_CHECKING:
    from typing_extensions import Unpack


@final
class SecureChannelPool:
    """A bounded pool of TLS channels to one relay, or to several. Made by `open_pool`.

    With several relays, ``max_connections`` and ``min_idle`` apply to each, each has its
    own circuit breaker, and a checkout picks among those whose breaker admits it by the
    power of two choices on load and recent latency; a failure to connect (before anything
    was sent) is retried on another relay before the caller sees it.

    Attributes:
        endpoints: The relays, in the order given.
        endpoint: The first (for a one-relay pool, the relay).
        config: The validated options.
        ssl_context: The client context every handshake uses.
        metrics_registry: The pool's own `prometheus_client.CollectorRegistry`.
    """

    def __init__(
        self,
        relays: Sequence[Relay],
        config: PoolConfig,
        ssl_context: ssl.SSLContext,
        *,
        breaker_events: EventBus[BreakerEvent],
        events: EventBus[dict[str, Any]],
        server: MetricsServer,
    ) -> None:
        self._relays = list(relays)
        self.endpoints = [relay.endpoint for relay in self._relays]
        self.endpoint = self.endpoints[0]
        self.config = config
        self.ssl_context = ssl_context
        self._breaker_events = breaker_events
        self._events = events
        self._server = server
        # Each checkout's time limit unless it gives its own (None: no limit).
        request_timeout = config.request_timeout
        self._request_timeout = None if request_timeout == math.inf else request_timeout
        # `connection()` chooses among the raw TLS relays, `websocket()` among the wss://
        # ones.
        streams = [relay for relay in self._relays if not relay.endpoint.is_websocket]
        websockets = [relay for relay in self._relays if relay.endpoint.is_websocket]
        self._streams = Router(streams) if streams else None
        self._websockets = Router(websockets) if websockets else None
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(
            PoolCollector(config.namespace, partial(self._snapshot, channels=False))
        )

    def __repr__(self) -> str:
        return f"<SecureChannelPool {', '.join(map(str, self.endpoints))}>"

    @property
    def closed(self) -> bool:
        """True once the pool has begun shutting down."""
        return self._relays[0].closed

    @property
    def healthy(self) -> bool:
        """True while at least one channel is established; False before and once empty."""
        return any(relay.healthy for relay in self._relays)

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker state of the relay best able to serve (the only one's)."""
        return serving_state(relay.breaker.state for relay in self._relays)

    def breaker_events(self) -> EventStream[BreakerEvent]:
        """Subscribe to the breakers' transitions: ``async for event in pool.breaker_events()``.

        Each event names its relay (``event.endpoint``). Each subscriber has its own buffer
        of 64 events; one that falls further behind loses the oldest (counted in its
        ``dropped``), so a slow reader never holds the pool up. Iteration ends when the pool
        closes. Use ``with pool.breaker_events() as events:`` (or call ``events.close()``)
        to unsubscribe earlier; a subscription dropped without closing is let go too.
        """
        return self._breaker_events.subscribe()

    def events(self) -> EventStream[dict[str, Any]]:
        """Subscribe to the pool's events as JSON-ready dicts, as ``/events`` sends them.

        Channels opened (``"channel_opened"``) and closed (``"channel_closed"``, with the
        reason) and breaker transitions (``"breaker"``), each naming its relay
        (``"endpoint"``). Buffered and ended like `breaker_events`.
        """
        return self._events.subscribe()

    def connection(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[SecureChannel]:
        """Check a TLS stream channel out for the duration of an ``async with`` block.

        The warmest idle channel is reused (LIFO) after a one-``poll()`` liveness check,
        else a new one is opened, else the call waits its turn (FIFO) for up to
        ``acquire_timeout``. When the block ends normally the channel goes back to the
        pool; after an exception or a cancellation it is closed instead, and the exception
        leaves the block unchanged.

        Args:
            timeout: Seconds the relay has, from the checkout, to answer every call the
                block awaits on the channel (`RequestTimeout` past it); None: the pool's
                ``request_timeout``; ``math.inf``: no limit for this checkout.

        Raises:
            PoolExhausted: All ``max_connections`` are in use and none came free in time.
            ConnectError: A new channel was needed and could not be opened (on any relay).
            CircuitOpen: Every relay's breaker is open; nothing was attempted.
            PoolClosed: The pool is shutting down.
            TypeError: The pool has no raw TLS relays (only ``wss://`` ones).
            ValueError: ``timeout`` is not a positive number of seconds; or (on entering)
                the ``ssl_context`` was weakened after the pool checked it, so no
                connection is made with it.
        """
        if self._streams is None:
            raise TypeError(
                f"{self!r} has only WebSocket (wss://) relays: check channels out with"
                " pool.websocket()"
            )
        if timeout is not None:
            return Lease(self._streams, self._checkout_timeout(timeout))
        return Lease(self._streams, self._request_timeout)  # (no Lease[...] here: a µs)

    def websocket(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[WebSocketChannel]:
        """Check a WebSocket channel out from the pool's ``wss://`` relays.

        As `connection`, with a `WebSocketChannel` (``send_message``, ``get_message``).
        An idle channel is lent only if nothing arrived on it: no message or part of
        one, no close, no bytes the reader has not read yet.

        Raises:
            TypeError: The pool has no ``wss://`` relays.
            And those of `connection`.
        """
        if self._websockets is None:
            raise TypeError(
                f"{self!r} has no WebSocket (wss://) relays: check channels out with"
                " pool.connection()"
            )
        if timeout is not None:
            return Lease(self._websockets, self._checkout_timeout(timeout))
        return Lease(self._websockets, self._request_timeout)

    @staticmethod
    def _checkout_timeout(timeout: float) -> float | None:
        """A checkout's own time limit (inf: none)."""
        check_seconds("timeout", timeout, positive=True)
        return None if timeout == math.inf else timeout

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the metrics server listens on; None without ``metrics_port``."""
        return self._server.address

    def metrics_text(self) -> bytes:
        """The pool's metrics in the Prometheus text format, as ``/metrics`` serves them."""
        return generate_latest(self.metrics_registry)

    def channels(self) -> list[Channel]:
        """The pool's open channels, idle and lent out, on every relay."""
        return [channel for relay in self._relays for channel in relay.channels()]

    def _snapshot(self, *, channels: bool = True) -> PoolSnapshot:
        """The pool's state and figures at this instant, frozen: what `status` and
        ``/metrics`` are made from (``channels``: each channel's figures too)."""
        return PoolSnapshot(
            self.closed, tuple(relay.snapshot(channels=channels) for relay in self._relays)
        )

    def status(self) -> PoolStatus:
        """A JSON-serialisable snapshot: totals, and each relay's own under ``endpoints``.

        Its shape is `PoolStatus` (the keys are always the same ones; see
        :doc:`observability`). ``/status`` on the metrics server serves it as JSON.
        """
        return pool_status(self._snapshot(), self.config.max_connections, self.config.min_idle)


def open_pool(
    target: Target | list[Target],
    *,
    config: PoolConfig | None = None,
    **options: Unpack[PoolOptions],
) -> AbstractAsyncContextManager[SecureChannelPool]:
    """Open a pool of TLS (or WebSocket over TLS) channels for an ``async with`` block.

    The pool owns a nursery for its background work (cleanup passes, keeping ``min_idle``
    spares, the breakers' timers, the metrics server). Leaving the block stops new
    checkouts (`PoolClosed`), closes idle channels with a TLS close_notify and waits up to
    ``shutdown_timeout`` for lent ones to come back before closing them anyway.

    Args:
        target: ``"host:port"``, ``"[v6addr]:port"``, ``"tls://host:port"`` or
            ``(host, port)`` for a relay speaking over raw TLS (`connection`);
            ``"wss://host[:port]/path"`` for a WebSocket relay (`websocket`); or a list
            of them, for a pool spread over several relays.
        config: A `PoolConfig` to start from.
        **options: `PoolConfig` fields (the `PoolOptions`), overriding ``config``.

    Returns:
        An async context manager yielding the `SecureChannelPool`.

    Raises:
        TypeError: An unknown option, or an option of the wrong type.
        ValueError: A malformed target or an out-of-range option, naming it.
        OSError: On entering the block: ``metrics_host``/``metrics_port`` cannot be bound.
    """
    endpoints = _parse_targets(target)
    if config is not None and not isinstance(config, PoolConfig):
        raise TypeError(f"config must be a PoolConfig, got {type(config).__name__}")
    base = config if config is not None else PoolConfig()
    config = base.replace(**options) if options else base
    _check_pinned_relays(config, endpoints)
    return _run_pool(endpoints, config)


def _parse_targets(target: object) -> list[Endpoint]:
    if isinstance(target, list):  # (a tuple is one (host, port))
        if not target:
            raise ValueError("target: an empty list of relays")
        endpoints = [Endpoint.parse(one, field=f"target[{i}]") for i, one in enumerate(target)]
        if len(set(endpoints)) != len(endpoints):
            twice = next(str(e) for e in endpoints if endpoints.count(e) > 1)
            raise ValueError(f"target: the same relay twice: {twice}")
        names = [str(endpoint) for endpoint in endpoints]
        if len(set(names)) != len(names):  # they differ in their queries, which are not shown
            clash = next(name for name in names if names.count(name) > 1)
            raise ValueError(
                f"target: relays that differ only in their query would share a name ({clash}:"
                " queries are not shown, they may hold secrets); give them distinct paths"
            )
        return endpoints
    return [Endpoint.parse(target)]


def _check_pinned_relays(config: PoolConfig, endpoints: list[Endpoint]) -> None:
    """A pin for a relay the pool does not have is a typo that would leave the real one
    unpinned: refuse it."""
    addresses = {pin_address(endpoint.host, endpoint.port) for endpoint in endpoints}
    for host, port in config.pinned:
        if (host, port) not in addresses:
            named = Endpoint(host, port)
            raise ValueError(f"pins: {named} is not one of the pool's relays")


@asynccontextmanager
async def _run_pool(
    endpoints: list[Endpoint], config: PoolConfig
) -> AsyncIterator[SecureChannelPool]:
    _require_trio()
    ssl_context = config.ssl_context
    if ssl_context is None:
        # Reading the system's roots is blocking file I/O: keep it off the event loop.
        ssl_context = await trio.to_thread.run_sync(load_root_store)
    breaker_events = EventBus[BreakerEvent]()
    events = EventBus[dict[str, Any]]()
    server = MetricsServer(config)
    body_error: BaseException | None = None
    background = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        relays = [
            Relay(
                endpoint,
                config,
                ssl_context,
                breaker_events=breaker_events,
                events=events,
                nursery=nursery,
            )
            for endpoint in endpoints
        ]
        pool = SecureChannelPool(
            relays, config, ssl_context, breaker_events=breaker_events, events=events,
            server=server,
        )  # fmt: skip
        try:
            nursery.start_soon(_run_background, relays, background)
            if config.metrics_port is not None:
                await server.start(nursery, pool)
            yield pool
        except BaseException as exc:
            # Re-raised below, outside the nursery, so it never comes out in an ExceptionGroup
            # (this includes a metrics port that cannot be bound).
            body_error = exc
        finally:
            background.cancel()  # no new spares, passes or timers while closing
            closing_began = trio.current_time()
            await _shut_down(relays)
            # Every figure is final: end the event streams (/events clients get a close).
            breaker_events.close()
            events.close()
            # After the relays, so /events clients saw it end; within what is left of
            # shutdown_timeout, whatever the metrics clients do.
            left = closing_began + config.shutdown_timeout - trio.current_time()
            await server.stop(grace=left)
            nursery.cancel_scope.cancel()  # (WebSocket channels' tasks end with them)
    if body_error is not None:
        raise body_error


def _require_trio() -> None:
    """A pool's nursery, sockets and timers are Trio's: under another event loop, say so.
    (What trio itself raises there, "must be called from async context", an AttributeError
    from deep inside it, or under trio-asyncio a TrioInternalError, does not say why.)"""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = "another event loop"
    if library != "trio":
        raise RuntimeError(
            "trio_securechannel is a Trio library: open_pool() must run under trio.run(),"
            f" not under {library} (an asyncio program can run Trio code with trio-asyncio)"
        )


async def _run_background(relays: list[Relay], scope: trio.CancelScope) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            for relay in relays:
                nursery.start_soon(relay.run_background)


async def _shut_down(relays: list[Relay]) -> None:
    """Every relay at once: stop lending, close idle channels, wait for lent ones."""
    for relay in relays:
        relay.stop_lending()  # all at once, before anything awaits
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for relay in relays:
                nursery.start_soon(relay.shutdown)
