"""`open_pool` and `SecureChannelPool`: one or several relays behind one checkout."""

from __future__ import annotations

import random
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

import trio
from prometheus_client import CollectorRegistry, generate_latest

from ._breaker import BreakerEvent, BreakerState
from ._channel import Channel, SecureChannel
from ._config import PoolConfig, PoolOptions
from ._endpoint import Endpoint, Target
from ._errors import CircuitOpen, ConnectError, PoolClosed
from ._events import EventBus, EventStream
from ._latency import Histogram
from ._metrics import PoolCollector
from ._relay import Relay
from ._server import MetricsServer
from ._tls import load_root_store
from ._websocket import WebSocketChannel

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: The share of checkouts that take the other of the two choices, so that every relay's
#: latency keeps being measured.
EXPLORE = 0.05

# How good a breaker state is for serving, best first: the pool reports its best relay's.
_SERVING_ORDER = (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)


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
        endpoints: Sequence[Endpoint],
        config: PoolConfig,
        ssl_context: ssl.SSLContext,
        nursery: trio.Nursery,
    ) -> None:
        self.endpoints = list(endpoints)
        self.endpoint = self.endpoints[0]
        self.config = config
        self.ssl_context = ssl_context
        self._breaker_events = EventBus[BreakerEvent]()
        # Channel and breaker events as JSON-ready dicts, for the /events stream.
        self._events = EventBus[dict[str, Any]]()
        self._relays = [
            Relay(
                endpoint,
                config,
                ssl_context,
                breaker_events=self._breaker_events,
                events=self._events,
                nursery=nursery,
            )
            for endpoint in self.endpoints
        ]
        # `connection()` chooses among the raw TLS relays, `websocket()` among the wss://
        # ones. Where there are several of a kind, they learn their latency for choosing.
        self._stream_relays = [r for r in self._relays if not r.endpoint.is_websocket]
        self._websocket_relays = [r for r in self._relays if r.endpoint.is_websocket]
        for relays in (self._stream_relays, self._websocket_relays):
            for relay in relays:
                relay.learns_latency = len(relays) > 1
        self._closed = False
        self._random = random.Random()
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(PoolCollector(self))
        self._metrics_address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"<SecureChannelPool {', '.join(map(str, self.endpoints))}>"

    @property
    def _relay(self) -> Relay:
        """The relay of a one-relay pool (tests and the fast path use it)."""
        (relay,) = self._relays
        return relay

    @property
    def closed(self) -> bool:
        """True once the pool has begun shutting down."""
        return self._closed

    @property
    def healthy(self) -> bool:
        """True while at least one channel is established; False before and once empty."""
        return any(relay.healthy for relay in self._relays)

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker state of the relay best able to serve (the only one's)."""
        states = {relay._breaker.state for relay in self._relays}
        return next(state for state in _SERVING_ORDER if state in states)

    def breaker_events(self) -> EventStream[BreakerEvent]:
        """Subscribe to the breakers' transitions: ``async for event in pool.breaker_events()``.

        Each event names its relay (``event.endpoint``). Each subscriber has its own buffer
        of 64 events; one that falls further behind loses the oldest (counted in its
        ``dropped``), so a slow reader never holds the pool up. Iteration ends when the pool
        closes. Use ``with pool.breaker_events() as events:`` (or call ``events.close()``)
        to unsubscribe earlier; a subscription dropped without closing is let go too.
        """
        return self._breaker_events.subscribe()

    def connection(self) -> AbstractAsyncContextManager[SecureChannel]:
        """Check a TLS stream channel out for the duration of an ``async with`` block.

        The warmest idle channel is reused (LIFO) after a one-``poll()`` liveness check,
        else a new one is opened, else the call waits its turn (FIFO) for up to
        ``acquire_timeout``. When the block ends normally the channel goes back to the
        pool; after an exception or a cancellation it is closed instead, and the exception
        leaves the block unchanged.

        Raises:
            PoolExhausted: All ``max_connections`` are in use and none came free in time.
            ConnectError: A new channel was needed and could not be opened (on any relay).
            CircuitOpen: Every relay's breaker is open; nothing was attempted.
            PoolClosed: The pool is shutting down.
            TypeError: The pool has no raw TLS relays (only ``wss://`` ones).
        """
        if not self._stream_relays:
            raise TypeError(
                f"{self!r} has only WebSocket (wss://) relays: check channels out with"
                " pool.websocket()"
            )
        return _Lease(self, self._stream_relays)  # (no _Lease[...] here: that costs a µs)

    def websocket(self) -> AbstractAsyncContextManager[WebSocketChannel]:
        """Check a WebSocket channel out from the pool's ``wss://`` relays.

        As `connection`, with a `WebSocketChannel` (``send_message``, ``get_message``).
        An idle channel is lent only if nothing arrived on it: no message or part of
        one, no close, no bytes the reader has not read yet.

        Raises:
            TypeError: The pool has no ``wss://`` relays.
            And those of `connection`.
        """
        if not self._websocket_relays:
            raise TypeError(
                f"{self!r} has no WebSocket (wss://) relays: check channels out with"
                " pool.connection()"
            )
        return _Lease(self, self._websocket_relays)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the metrics server listens on; None without ``metrics_port``."""
        return self._metrics_address

    def metrics_text(self) -> bytes:
        """The pool's metrics in the Prometheus text format, as ``/metrics`` serves them."""
        return generate_latest(self.metrics_registry)

    def channels(self) -> list[Channel]:
        """The pool's open channels, idle and lent out, on every relay."""
        return [channel for relay in self._relays for channel in relay.channels()]

    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: totals, and each relay's own under ``endpoints``."""
        per_relay = [relay.status() for relay in self._relays]
        if len(per_relay) == 1:
            return {**per_relay[0], "closed": self._closed, "endpoints": per_relay}
        now = trio.current_time()
        total: dict[str, Any] = {
            "target": ", ".join(str(endpoint) for endpoint in self.endpoints),
            "healthy": self.healthy,
            "closed": self._closed,
            "connections": {
                **_sum_dicts([s["connections"] for s in per_relay]),
                "max": self.config.max_connections,  # per relay, as configured
                "min_idle": self.config.min_idle,
            },
            "breaker": {
                "state": self.breaker_state.value,
                "consecutive_failures": min(
                    s["breaker"]["consecutive_failures"] for s in per_relay
                ),
                "retry_after": self._retry_after(now),
                "opened_total": sum(s["breaker"]["opened_total"] for s in per_relay),
                "rejected_total": sum(s["breaker"]["rejected_total"] for s in per_relay),
            },
            "errors_by_kind": _sum_dicts([s["errors_by_kind"] for s in per_relay]),
            "pool_exhausted_total": sum(s["pool_exhausted_total"] for s in per_relay),
            "bytes_sent_total": sum(s["bytes_sent_total"] for s in per_relay),
            "bytes_received_total": sum(s["bytes_received_total"] for s in per_relay),
            "latency": _merged_latency(self._relays),
            "channels": [
                {**channel, "endpoint": s["target"]} for s in per_relay for channel in s["channels"]
            ],
            "endpoints": per_relay,
        }
        total["errors_total"] = sum(total["errors_by_kind"].values())
        return total

    def _retry_after(self, now: float) -> float | None:
        """Seconds until some relay admits a checkout; None while one does."""
        if any(relay.admits(now) for relay in self._relays):
            return None
        return min(relay._breaker.retry_after(now) or 0.0 for relay in self._relays)

    # -- choosing a relay -----------------------------------------------------------------

    async def _checkout_routed(self, relays: list[Relay]) -> tuple[Relay, Channel]:
        """Checkout across relays: the better of two choices first, the others as fallbacks.

        Relays that can serve at once (a warm channel, or room to open one) are tried
        before anyone waits in line, and a failure before anything was sent (no channel
        could be opened, the breaker opened meanwhile) moves on to the next relay, so
        callers see no error while any relay works. Only when every relay is full does the
        checkout wait, on the best one, for up to ``acquire_timeout``.
        """
        now = trio.current_time()
        names = ", ".join(str(relay.endpoint) for relay in relays)
        if self._closed:
            raise PoolClosed(names)
        candidates = [relay for relay in relays if relay.admits(now)]
        if not candidates:
            # Refused by the pool as a whole: counted once, on the relay back the soonest.
            soonest = min(relays, key=lambda r: r._breaker.retry_after(now) or 0.0)
            soonest._breaker.rejected_total += 1
            retry_after = soonest._breaker.retry_after(now) or 0.0
            raise CircuitOpen(names, retry_after)
        ranked = self._ranked(candidates)
        failures: list[ConnectError | CircuitOpen] = []
        for relay in ranked:  # in order of preference, the first that serves at once
            channel = relay._take_warm_channel()
            if channel is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return relay, channel
            if relay.has_room():
                try:
                    return relay, await relay._checkout()  # reuses or opens: no waiting
                except (ConnectError, CircuitOpen) as exc:
                    failures.append(exc)
        if not failures:  # every relay is full: wait in line at the best one
            return ranked[0], await ranked[0]._checkout()
        connect_errors = [exc for exc in failures if isinstance(exc, ConnectError)]
        if connect_errors:
            raise connect_errors[-1]
        raise min(failures, key=lambda exc: getattr(exc, "retry_after", 0.0))

    def _ranked(self, candidates: list[Relay]) -> list[Relay]:
        """Power of two choices: the better of two random candidates, then the rest.

        Ties go either way at random, and now and then the other of the two is taken, so
        a relay that looked slow once is measured again rather than starved.
        """
        draw = self._random.random
        pair = self._random.sample(candidates, 2) if len(candidates) > 2 else list(candidates)
        pair.sort(key=lambda relay: (_load(relay), draw()))
        if len(pair) == 2 and draw() < EXPLORE:
            pair.reverse()
        rest = sorted((c for c in candidates if c not in pair), key=_load)
        return [*pair, *rest]

    # -- shutdown -------------------------------------------------------------------------

    async def _run_background(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for relay in self._relays:
                    nursery.start_soon(relay.run_background)

    async def _shutdown(self) -> None:
        """Every relay at once: stop lending, close idle channels, wait for lent ones."""
        self._closed = True
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for relay in self._relays:
                    nursery.start_soon(relay.shutdown)
        # Every figure is final: end the event streams (/events clients get a close frame).
        self._breaker_events.close()
        self._events.close()


def _load(relay: Relay) -> float:
    """Lower is better: channels busy or opening, times recent latency (unknown: 0, so a
    new or revived relay gets tried)."""
    slots = relay._slots
    return (len(slots.in_use) + slots.opening + 1) * (relay.latency_estimate or 0.0)


def _sum_dicts(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for entry in dicts:
        for key, value in entry.items():
            if isinstance(value, dict):
                total[key] = dict(Counter(total.get(key, {})) + Counter(value))
            else:
                total[key] = total.get(key, 0) + value
    return total


def _merged_latency(relays: list[Relay]) -> dict[str, Any]:
    merged = [Histogram(), Histogram(), Histogram()]
    for relay in relays:
        for total, part in zip(merged, relay.recent_histograms(), strict=True):
            total.merge(part)
    handshake, round_trip, acquire_wait = (histogram.summary() for histogram in merged)
    return {"handshake": handshake, "round_trip": round_trip, "acquire_wait": acquire_wait}


ChannelT = TypeVar("ChannelT", bound=Channel)


@final
class _Lease(Generic[ChannelT]):
    """``async with pool.connection() as channel``: one checkout and its end.

    ``relays`` are those of the kind asked for, whose channels are all ``ChannelT``.
    """

    __slots__ = ("_channel", "_pool", "_relay", "_relays")

    def __init__(self, pool: SecureChannelPool, relays: list[Relay]) -> None:
        self._pool = pool
        self._relays = relays
        self._relay: Relay | None = None
        self._channel: Channel | None = None

    async def __aenter__(self) -> ChannelT:
        if self._channel is not None:
            raise RuntimeError("a pool connection lease cannot be entered twice")
        # As trio.Semaphore.acquire does: a cancellation point first, then either the
        # synchronous fast path and a shielded yield, or the general path's own waits.
        await trio.lowlevel.checkpoint_if_cancelled()
        relays = self._relays
        if len(relays) == 1:
            (relay,) = relays
            channel = relay._take_warm_channel()
            if channel is None:
                channel = await relay._checkout()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            relay, channel = await self._pool._checkout_routed(relays)
        self._relay, self._channel = relay, channel
        return channel  # type: ignore[return-value]  # relays of its kind lend only those

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Returns None: the block's own exception, if any, always propagates unchanged.
        channel, relay = self._channel, self._relay
        assert channel is not None
        assert relay is not None
        if exc_type is not None:
            await relay._discard(channel, exc)
            return
        reason = relay._give_back(channel)
        if reason is not None:
            await relay._retire(channel, reason, graceful=True)


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
        **options: `PoolConfig` fields, overriding ``config``.

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
    return _run_pool(endpoints, base.replace(**options) if options else base)


def _parse_targets(target: object) -> list[Endpoint]:
    if isinstance(target, list):  # (a tuple is one (host, port))
        if not target:
            raise ValueError("target: an empty list of relays")
        endpoints = [Endpoint.parse(one, field=f"target[{i}]") for i, one in enumerate(target)]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"target: the same relay twice in {target!r}")
        return endpoints
    return [Endpoint.parse(target)]


@asynccontextmanager
async def _run_pool(
    endpoints: list[Endpoint], config: PoolConfig
) -> AsyncIterator[SecureChannelPool]:
    ssl_context = config.ssl_context
    if ssl_context is None:
        # Reading the system's roots is blocking file I/O: keep it off the event loop.
        ssl_context = await trio.to_thread.run_sync(load_root_store)
    body_error: BaseException | None = None
    background = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        pool = SecureChannelPool(endpoints, config, ssl_context, nursery)
        server = MetricsServer(pool)
        try:
            nursery.start_soon(pool._run_background, background)
            if config.metrics_port is not None:
                pool._metrics_address = await server.start(nursery)
            yield pool
        except BaseException as exc:
            # Re-raised below, outside the nursery, so it never comes out in an ExceptionGroup
            # (this includes a metrics port that cannot be bound).
            body_error = exc
        finally:
            background.cancel()  # no new spares, passes or timers while closing
            await pool._shutdown()
            await server.stop()  # after the shutdown, so /events clients saw it end
            nursery.cancel_scope.cancel()  # (WebSocket readers end with their channels)
    if body_error is not None:
        raise body_error
