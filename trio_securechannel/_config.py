"""`PoolConfig`: every option of a pool, validated once, frozen so it can be reused."""

from __future__ import annotations

import dataclasses
import math
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, cast, final

import trio

from ._channel import MAX_LINE_LENGTH
from ._endpoint import check_host
from ._pinning import check_pins
from ._tls import check_client_context

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: Opens the byte stream TLS runs over (default `trio.open_tcp_stream`), e.g. through a proxy.
OpenTransport = Callable[[str, int], Awaitable[trio.abc.Stream]]

#: Runs on each new channel before it is lent or pooled (``setup``); given the channel.
Setup = Callable[[Any], Awaitable[None]]

#: Public-key pins per relay (``pins``): ``{"host:port": "sha256/..."}``, or several pins
#: per relay in a list (the current key and the next one).
Pins = Mapping[str, str | Sequence[str]]

_METRIC_PREFIX = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# An HTTP token (RFC 9110): header names and WebSocket subprotocols.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Headers the WebSocket upgrade sets itself.
_UPGRADE_HEADERS = frozenset(
    ["host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
     "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions",
     "content-length", "transfer-encoding"]
)  # fmt: skip

#: Extra headers for the WebSocket upgrade: a mapping or ``(name, value)`` pairs.
Headers = Mapping[str, str] | Sequence[tuple[str, str]]

# Bounds no real pool reaches (a million sockets, a gigabyte in one line): past them a
# value is a mistake, and one too big for a float would break every /metrics scrape.
_MAX_CONNECTIONS = 1_000_000
_MAX_MESSAGE_BYTES = 1 << 30
_MAX_BREAKER_THRESHOLD = 1_000_000_000


@final
@dataclass(frozen=True)
class PoolConfig:
    """The options of a pool. Every field is checked when the config is built.

    Attributes:
        ssl_context: Client context for the handshakes. None: `load_root_store()` (system
            roots). A context you pass must verify certificates and hostnames and refuse
            anything below TLS 1.2.
        namespace: Prefix of the pool's metric names.
        max_connections: Hard bound on channels open at once: idle, in use and being opened.
        min_idle: Channels kept open and ready, refilled in the background.
        connect_timeout: Seconds allowed for TCP connect plus TLS handshake (plus the
            WebSocket upgrade for ``wss://``); also how long a WebSocket keepalive ping
            waits for its pong.
        acquire_timeout: Seconds a checkout may wait for a channel when all are in use;
            0 fails at once with `PoolExhausted`, ``math.inf`` waits as long as it takes.
        request_timeout: Seconds a lent channel's relay has, from the checkout, to answer
            every call the block awaits (``pool.connection(timeout=...)`` overrides it per
            checkout). Past it the waiting call raises `RequestTimeout`, the channel is
            discarded and the relay is held responsible (an error of kind ``"timeout"``,
            a failure for its breaker). None: no limit but your own.
        idle_timeout: Idle channels beyond ``min_idle`` are closed after this many seconds.
        max_lifetime: Channels older than this are closed when idle or given back
            (None: no limit).
        cleanup_interval: Seconds between cleanup passes (stale, idle and old channels).
        shutdown_timeout: Seconds the pool's exit may spend closing channels gracefully.
        setup (Callable[[Channel], Awaitable[None]] | None): ``await setup(channel)`` runs
            on each new channel after its handshake, before it is lent or pooled as a spare,
            within its own ``connect_timeout``: the first exchange a relay's protocol
            requires (Electrum's ``server.version``). Any exception it raises, or running
            out of time, is a failure to connect (`ConnectError` with phase ``"setup"``,
            counted for the breaker); it must leave the channel at a message boundary (every
            reply read). A ``setup`` that is not async raises `TypeError`, held against
            nobody.
        max_line_length: The longest line `SecureChannel.receive_line` accepts from a
            relay, in bytes; a longer one raises `ProtocolError` and discards the channel
            (an error of kind ``"too_big"``, but no failure for the breaker: the limit is
            ours). Electrum servers may send up to 8,100,000 bytes: raise it for large
            replies.
        pins (Mapping[str, str | Sequence[str]]): Trust these relays by their public key
            instead of a CA: ``{"host:port": "sha256/<base64>"}`` (a list for several keys),
            the SHA-256 of the certificate's SubjectPublicKeyInfo, as HPKP and Electrum
            clients pin self-signed relays (`public_key_pin` computes it). Checked on every
            handshake; a relay that shows another key fails (`ConnectError`, phase
            ``"pin"``). Relays not named are verified as usual.
        open_transport (Callable[[str, int], Awaitable[trio.abc.Stream]] | None):
            ``await open_transport(host, port)`` returns the stream TLS runs
            over; None is `trio.open_tcp_stream`. Use it to go through a proxy.
        breaker_failure_threshold: Consecutive failures (failed connects or handshakes,
            I/O errors on lent channels) that open the circuit breaker.
        breaker_cooldown: Seconds the breaker stays open before trial checkouts.
        breaker_half_open_trials: Trial checkouts let through once the cooldown is over.
        histogram_rotation_interval: Seconds each latency window covers; the cleanup pass
            starts a new one when it is due, keeping one previous window.
        max_latency_ms: Channels whose median round trip over their last 8 is slower than
            this are retired (reason ``"slow"``) by the cleanup pass. None: never.
        metrics_port: Serve ``/metrics``, ``/status``, ``/healthz`` and ``/events`` on this
            port (0: any free one, see `SecureChannelPool.metrics_address`). None: no server.
        metrics_host: Address the metrics server listens on.
        metrics_auth_token: When set, ``/metrics``, ``/status`` and ``/events`` require it,
            as ``X-Auth-Token: <token>`` or ``Authorization: Bearer <token>``.
        metrics_max_connections: Connections the metrics server holds open at once
            (``/events`` listeners included); when full, the oldest idle one is closed to
            make room, or the new one refused if none is idle. Bounds its file descriptors.
        websocket_headers (Mapping[str, str] | Sequence[tuple[str, str]]): Extra headers for
            the upgrade of ``wss://`` channels (a mapping or ``(name, value)`` pairs), e.g.
            ``{"Authorization": "Bearer ..."}``; kept as pairs, and out of reprs and logs.
        websocket_subprotocols: Subprotocols the upgrade offers, in order of preference
            (`WebSocketChannel.subprotocol` says which the relay chose).
        websocket_max_message_size: Largest message accepted from a relay, in bytes (or
            characters); a larger one closes the channel's WebSocket (1009), counted as
            ``"too_big"`` like a line over ``max_line_length``.
    """

    ssl_context: ssl.SSLContext | None = None
    namespace: str = "securechannel"
    max_connections: int = 10
    min_idle: int = 0
    connect_timeout: float = 10.0
    acquire_timeout: float = 0.0
    request_timeout: float | None = None
    idle_timeout: float = 300.0
    max_lifetime: float | None = None
    cleanup_interval: float = 5.0
    shutdown_timeout: float = 5.0
    setup: Setup | None = None
    max_line_length: int = MAX_LINE_LENGTH
    pins: Pins = field(default_factory=dict, repr=False)  # normalised to ((host, port), digests)
    open_transport: OpenTransport | None = None
    breaker_failure_threshold: int = 5
    breaker_cooldown: float = 60.0
    breaker_half_open_trials: int = 1
    histogram_rotation_interval: float = 60.0
    max_latency_ms: float | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_auth_token: str | None = field(default=None, repr=False)  # never in reprs or logs
    metrics_max_connections: int = 64
    websocket_headers: Headers = field(default=(), repr=False)  # may carry credentials
    websocket_subprotocols: Sequence[str] = ()
    websocket_max_message_size: int = 1 << 20

    def __post_init__(self) -> None:
        if self.ssl_context is not None:
            check_client_context(self.ssl_context, field="ssl_context")
        if not isinstance(self.namespace, str) or not _METRIC_PREFIX.match(self.namespace):
            raise ValueError(
                f"namespace must be a metric name prefix ([a-zA-Z_][a-zA-Z0-9_]*),"
                f" got {self.namespace!r}"
            )
        _check_int("max_connections", self.max_connections, minimum=1, maximum=_MAX_CONNECTIONS)
        _check_int("min_idle", self.min_idle, minimum=0, maximum=_MAX_CONNECTIONS)
        if self.min_idle > self.max_connections:
            raise ValueError(
                f"min_idle ({self.min_idle}) must not exceed max_connections"
                f" ({self.max_connections})"
            )
        check_seconds("connect_timeout", self.connect_timeout, positive=True, finite=True)
        check_seconds("acquire_timeout", self.acquire_timeout)
        if self.request_timeout is not None:
            check_seconds("request_timeout", self.request_timeout, positive=True)
        check_seconds("idle_timeout", self.idle_timeout, positive=True)
        if self.max_lifetime is not None:
            check_seconds("max_lifetime", self.max_lifetime, positive=True)
        check_seconds("cleanup_interval", self.cleanup_interval, positive=True, finite=True)
        check_seconds("shutdown_timeout", self.shutdown_timeout, finite=True)
        if self.setup is not None and not callable(self.setup):
            raise TypeError(f"setup must be an async callable, got {self.setup!r}")
        _check_int("max_line_length", self.max_line_length, minimum=1, maximum=_MAX_MESSAGE_BYTES)
        object.__setattr__(self, "pins", check_pins(self.pins))
        if self.open_transport is not None and not callable(self.open_transport):
            raise TypeError(f"open_transport must be callable, got {self.open_transport!r}")
        _check_int(
            "breaker_failure_threshold",
            self.breaker_failure_threshold,
            minimum=1,
            maximum=_MAX_BREAKER_THRESHOLD,
        )
        check_seconds("breaker_cooldown", self.breaker_cooldown, finite=True)
        _check_int(
            "breaker_half_open_trials",
            self.breaker_half_open_trials,
            minimum=1,
            maximum=_MAX_CONNECTIONS,
        )
        check_seconds(
            "histogram_rotation_interval",
            self.histogram_rotation_interval,
            positive=True,
            finite=True,
        )
        if self.max_latency_ms is not None:
            check_seconds(
                "max_latency_ms", self.max_latency_ms, positive=True, finite=True, unit="ms"
            )
        if self.metrics_port is not None:
            _check_int("metrics_port", self.metrics_port, minimum=0, maximum=65535)
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise ValueError(
                f"metrics_host must be a host name or address, got {self.metrics_host!r}"
            )
        check_host(self.metrics_host, field="metrics_host")  # what the listener can bind
        _check_int(
            "metrics_max_connections",
            self.metrics_max_connections,
            minimum=1,
            maximum=_MAX_CONNECTIONS,
        )
        token = self.metrics_auth_token
        if token is not None:
            if not isinstance(token, str):
                raise TypeError(f"metrics_auth_token must be a str, got {type(token).__name__}")
            if not token or not token.isprintable() or token != token.strip():
                # Not echoed: even a malformed token may be most of a secret.
                raise ValueError(
                    "metrics_auth_token must be non-empty printable text without surrounding"
                    " spaces; omit it (None) for no authentication"
                )
        # Frozen: normalised copies go in with object.__setattr__.
        object.__setattr__(self, "websocket_headers", _check_headers(self.websocket_headers))
        object.__setattr__(
            self, "websocket_subprotocols", _check_subprotocols(self.websocket_subprotocols)
        )
        _check_int(
            "websocket_max_message_size",
            self.websocket_max_message_size,
            minimum=1,
            maximum=_MAX_MESSAGE_BYTES,
        )

    @property
    def pinned(self) -> dict[tuple[str, int], tuple[bytes, ...]]:
        """The pinned relays' ``(host, port)``, each with the SHA-256 digests its public
        key may have."""
        return dict(cast("tuple[tuple[tuple[str, int], tuple[bytes, ...]], ...]", self.pins))

    def websocket_header_pairs(self) -> list[tuple[bytes, bytes]]:
        """``websocket_headers`` as the upgrade sends them."""
        pairs = cast("tuple[tuple[str, str], ...]", self.websocket_headers)  # (normalised)
        return [(name.encode("ascii"), value.encode("ascii")) for name, value in pairs]

    def replace(self, **options: Unpack[PoolOptions]) -> PoolConfig:
        """Return a copy with some options changed (validated like a new config).

        Raises:
            TypeError: An option name is unknown.
        """
        return dataclasses.replace(self, **_known_options(options))


class PoolOptions(TypedDict, total=False):
    """The keyword options of `open_pool` (and `PoolConfig.replace`), one per `PoolConfig`
    field, each optional: ``open_pool(target, max_connections=50, min_idle=5)``. An option
    given overrides the ``config`` passed, else the default. Each is described in full
    under `PoolConfig`.

    Keys:
        ssl_context (ssl.SSLContext | None): Client context for the handshakes (default
            None: `load_root_store()`, the system roots).
        namespace (str): Prefix of the metric names (``"securechannel"``).
        max_connections (int): Channels open at once, per relay, at most (10).
        min_idle (int): Channels kept open and ready (0).
        connect_timeout (float): Seconds for TCP connect, TLS handshake and WebSocket
            upgrade (10).
        acquire_timeout (float): Seconds a checkout waits when every channel is in use
            (0: `PoolExhausted` at once).
        request_timeout (float | None): Seconds a lent channel's relay has to answer
            (None: no limit).
        idle_timeout (float): Seconds before idle channels beyond ``min_idle`` close (300).
        max_lifetime (float | None): Seconds after which a channel is closed (None: never).
        cleanup_interval (float): Seconds between cleanup passes (5).
        shutdown_timeout (float): Seconds the pool's exit may spend closing gracefully (5).
        setup (Callable[[Channel], Awaitable[None]] | None): ``await setup(channel)`` on
            each new channel (None).
        max_line_length (int): The longest line `SecureChannel.receive_line` accepts, in
            bytes (1 MiB).
        pins (Mapping[str, str | Sequence[str]]): Public-key pins per relay,
            ``{"host:port": "sha256/..."}``.
        open_transport (Callable[[str, int], Awaitable[trio.abc.Stream]] | None):
            ``await open_transport(host, port)`` opens the stream under TLS (None:
            `trio.open_tcp_stream`).
        breaker_failure_threshold (int): Consecutive failures that open a relay's breaker
            (5).
        breaker_cooldown (float): Seconds an open breaker waits before trials (60).
        breaker_half_open_trials (int): Trial checkouts after the cooldown (1).
        histogram_rotation_interval (float): Seconds each latency window covers (60).
        max_latency_ms (float | None): Retire channels whose median round trip is slower
            (None: never).
        metrics_port (int | None): Serve ``/metrics``, ``/status``, ``/healthz`` and
            ``/events`` on this port (None: no server; 0: any free port).
        metrics_host (str): Address the metrics server listens on (``"127.0.0.1"``).
        metrics_auth_token (str | None): Token the metrics server requires (None: none).
        metrics_max_connections (int): Connections the metrics server holds at once (64).
        websocket_headers (Mapping[str, str] | Sequence[tuple[str, str]]): Extra headers
            for ``wss://`` upgrades.
        websocket_subprotocols (Sequence[str]): Subprotocols the upgrade offers.
        websocket_max_message_size (int): Largest message accepted over ``wss://``
            (1 MiB).
    """

    ssl_context: ssl.SSLContext | None
    namespace: str
    max_connections: int
    min_idle: int
    connect_timeout: float
    acquire_timeout: float
    request_timeout: float | None
    idle_timeout: float
    max_lifetime: float | None
    cleanup_interval: float
    shutdown_timeout: float
    setup: Setup | None
    max_line_length: int
    pins: Pins
    open_transport: OpenTransport | None
    breaker_failure_threshold: int
    breaker_cooldown: float
    breaker_half_open_trials: int
    histogram_rotation_interval: float
    max_latency_ms: float | None
    metrics_port: int | None
    metrics_host: str
    metrics_auth_token: str | None
    metrics_max_connections: int
    websocket_headers: Headers
    websocket_subprotocols: Sequence[str]
    websocket_max_message_size: int


def _check_headers(headers: object) -> tuple[tuple[str, str], ...]:
    if isinstance(headers, Mapping):
        headers = list(headers.items())
    if isinstance(headers, str | bytes) or not isinstance(headers, Sequence):
        raise TypeError(
            f"websocket_headers must be a mapping or (name, value) pairs,"
            f" got {type(headers).__name__}"
        )
    pairs = []
    # Neither names nor values are echoed in errors: a value may be a credential, and a
    # swapped pair would put it in the name.
    for number, pair in enumerate(headers, 1):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"websocket_headers: header {number} is not a (name, value) pair")
        name, value = pair
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ValueError(
                f"websocket_headers: header {number} has an invalid name (an HTTP token)"
            )
        if name.lower() in _UPGRADE_HEADERS:
            raise ValueError(
                f"websocket_headers: {name!r} is set by the WebSocket upgrade itself"
                " (subprotocols go in websocket_subprotocols)"
            )
        if (
            not isinstance(value, str)
            or not value.isascii()
            or not value.isprintable()
            or value != value.strip()
        ):
            raise ValueError(
                f"websocket_headers: the value of header {number} must be printable ASCII"
                " text without surrounding spaces"
            )
        pairs.append((name, value))
    return tuple(pairs)


def _check_subprotocols(subprotocols: object) -> tuple[str, ...]:
    if isinstance(subprotocols, str | bytes) or not isinstance(subprotocols, Sequence):
        raise TypeError(
            f"websocket_subprotocols must be a sequence of names, got {type(subprotocols).__name__}"
        )
    for name in subprotocols:
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ValueError(f"websocket_subprotocols: invalid subprotocol name {name!r}")
    return tuple(subprotocols)


def _known_options(options: dict[str, Any] | PoolOptions) -> dict[str, Any]:
    known = {field.name for field in dataclasses.fields(PoolConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown pool option(s) {', '.join(map(repr, unknown))};"
            f" valid options are: {', '.join(sorted(known))}"
        )
    return dict(options)


def _check_int(field: str, value: object, *, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {_shown(value)}")
    if value > maximum:
        raise ValueError(f"{field} must be <= {maximum}, got {_shown(value)}")


def _shown(value: float) -> str:
    """A number for an error message: an int of thousands of digits is not spelled out
    (past 4300 digits, str() itself refuses)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"
    return str(value)


def check_seconds(
    field: str,
    value: object,
    *,
    positive: bool = False,
    finite: bool = False,
    unit: str = "seconds",
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number of {unit}, got {value!r}")
    # (an int is compared as it is: past 1.8e308, float() and math.isnan() overflow)
    if (isinstance(value, float) and math.isnan(value)) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{field} must be {'> 0' if positive else '>= 0'} {unit}, got {_shown(value)}"
        )
    if isinstance(value, int) and value > sys.float_info.max:
        no_limit = "" if finite else "; math.inf means no limit"
        raise ValueError(f"{field} is too large, got {_shown(value)} {unit}{no_limit}")
    if finite and math.isinf(value):
        raise ValueError(f"{field} must be finite, got {value}")
