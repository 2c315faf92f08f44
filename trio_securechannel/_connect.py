"""Opening a channel: TCP connect, TLS handshake and (``wss://``) WebSocket upgrade under one
deadline.

Only failures to connect become `ConnectError` (which the pool feeds to its circuit
breaker): transport and TLS errors, the WebSocket upgrade's, and ``connect_timeout``.
Anything else is a bug, ours or in a custom ``open_transport``, and propagates as itself.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable
from typing import cast

import trio

from ._channel import Channel, SecureChannel
from ._config import PoolConfig
from ._endpoint import Endpoint
from ._errors import ConnectError
from ._tls import check_client_context
from ._tls_buffers import TlsBuffers
from ._websocket import UpgradeFailed, WebSocketChannel, start_session

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def open_channel(
    endpoint: Endpoint,
    ssl_context: ssl.SSLContext,
    config: PoolConfig,
    *,
    on_error: Callable[[Channel, str], None] | None = None,
    on_trial_answered: Callable[[Channel], None] | None = None,
    nursery: trio.Nursery | None = None,
) -> Channel:
    """Connect to ``endpoint`` and complete a verified TLS handshake, within
    ``config.connect_timeout`` (over ``config.open_transport`` when set).

    For a ``wss://`` endpoint the WebSocket upgrade follows, within the same timeout, with
    ``config``'s ``websocket_*`` options; the session's task is started in ``nursery``.
    Whatever happens before the channel is ready (an error, a timeout, a cancellation),
    the half-made connection is closed before this returns or raises.

    Raises:
        ConnectError: TCP, DNS, TLS or WebSocket upgrade failure, or ``connect_timeout``
            ran out.
        TypeError: ``open_transport`` returned something that is not a `trio.abc.Stream`.
        ValueError: ``ssl_context`` is no longer safe (it was weakened after the pool
            checked it): no connection is made with it.
    """
    if endpoint.is_websocket and nursery is None:
        raise RuntimeError("a WebSocket channel needs a nursery for its session's task")
    _check_still_safe(ssl_context)
    name = str(endpoint)
    tls_buffers = TlsBuffers(ssl_context)
    session = None
    try:
        # A handshake without a deadline hangs forever on a peer that never speaks TLS.
        with trio.fail_after(config.connect_timeout):
            transport = await _open_transport(endpoint, config)
            try:
                handshake_began = trio.current_time()
                # (trio asks its context only for wrap_bio: the buffers pass it on.)
                tls = cast("ssl.SSLContext", tls_buffers)
                ssl_stream = trio.SSLStream(transport, tls, server_hostname=endpoint.host)
                await _handshake(ssl_stream, name)
                if nursery is not None and endpoint.is_websocket:
                    session = await start_session(nursery, ssl_stream, endpoint, config)
            except BaseException:
                await trio.aclose_forcefully(transport)
                raise
    except trio.TooSlowError:
        kind = "WebSocket" if endpoint.is_websocket else "TLS"
        raise ConnectError(
            name, "timeout", f"no {kind} session within connect_timeout={config.connect_timeout:g}s"
        ) from None
    except UpgradeFailed as exc:
        raise ConnectError(name, "websocket", str(exc)) from exc.__cause__
    handshake_seconds = trio.current_time() - handshake_began
    if session is not None:
        return WebSocketChannel(
            ssl_stream,
            endpoint,
            session,
            on_error=on_error,
            on_trial_answered=on_trial_answered,
            handshake_seconds=handshake_seconds,
        )
    return SecureChannel(
        ssl_stream,
        endpoint,
        on_error=on_error,
        on_trial_answered=on_trial_answered,
        handshake_seconds=handshake_seconds,
        tls_buffers=tls_buffers,
    )


def _check_still_safe(ssl_context: ssl.SSLContext) -> None:
    """The pool checked its context once; a context is mutable, so check before each use
    (four attribute reads: nothing next to a handshake)."""
    try:
        check_client_context(ssl_context)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (the context was changed after the pool was opened; no connection"
            " is made with it)"
        ) from None


async def _open_transport(endpoint: Endpoint, config: PoolConfig) -> trio.abc.Stream:
    opener = config.open_transport or trio.open_tcp_stream
    name = str(endpoint)
    try:
        transport = await opener(endpoint.host, endpoint.port)
    except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), ...
        raise ConnectError(name, "tcp", f"TCP connect failed: {_describe(exc)}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # A transport that speaks to a proxy first (HTTP CONNECT, SOCKS) sees a proxy that
        # resets or hangs up as trio stream errors: still a failure to connect.
        raise ConnectError(name, "tcp", f"cannot connect: {_describe(exc)}") from exc
    except UnicodeError as exc:
        # The resolver's IDNA 2008 encoding refused the name (stricter than the IDNA 2003
        # check open_pool made): a name that cannot be looked up.
        raise ConnectError(name, "tcp", f"cannot connect: {_describe(exc)}") from exc
    if not isinstance(transport, trio.abc.Stream):
        raise TypeError(
            f"open_transport must return a trio.abc.Stream, got {type(transport).__name__!r}"
        )
    return transport


async def _handshake(ssl_stream: trio.SSLStream[trio.abc.Stream], name: str) -> None:
    try:
        await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # trio keeps the ssl.SSLError (or the transport's error) as the cause.
        cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else exc
        raise ConnectError(name, "tls", f"TLS handshake failed: {_describe(cause)}") from cause
    except OSError as exc:  # a custom transport's own error, passed through as it is
        raise ConnectError(name, "tls", f"TLS handshake failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    # trio.open_tcp_stream reports "all attempts ... failed", keeping each address's error
    # in a group behind it: name those, since "refused" is what the reader needs to see.
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and group.exceptions:
        reasons = dict.fromkeys(_describe(inner) for inner in group.exceptions)
        return f"{exc}: {'; '.join(reasons)}"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
