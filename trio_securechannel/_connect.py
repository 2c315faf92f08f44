"""Opening a channel: TCP connect, TLS handshake and (``wss://``) WebSocket upgrade under one
deadline.

Only failures to connect become `ConnectError` (which the pool feeds to its circuit
breaker): transport and TLS errors, a pinned key that does not match, the WebSocket
upgrade's, ``connect_timeout``, and whatever the ``setup`` exchange raises.
Anything else is a bug, ours or in a custom ``open_transport``, and propagates as itself.
"""

from __future__ import annotations

import inspect
import os
import ssl
import sys
from collections.abc import Callable
from typing import cast

import trio

from ._channel import Channel, SecureChannel
from ._config import PoolConfig, Setup
from ._endpoint import Endpoint
from ._errors import ConnectError
from ._pinning import check_pin, pin_address, pinned_context
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
    pins = config.pinned.get(pin_address(endpoint.host, endpoint.port))
    if pins:
        ssl_context = pinned_context(ssl_context)  # the pin, checked below, is the trust
    else:
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
                await _handshake(ssl_stream, name, ssl_context)
                if pins:  # before a byte is sent
                    check_pin(ssl_stream.getpeercert(binary_form=True), pins, name)
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
    channel: Channel
    if session is not None:
        channel = WebSocketChannel(
            ssl_stream, endpoint, session, handshake_seconds=handshake_seconds
        )
    else:
        channel = SecureChannel(
            ssl_stream,
            endpoint,
            handshake_seconds=handshake_seconds,
            tls_buffers=tls_buffers,
            max_line_length=config.max_line_length,
        )
    if config.setup is not None:
        await _set_up(channel, config.setup, config.connect_timeout)
    # Only now does the pool hear of the channel's failures: the setup's are the connect's.
    channel.report_to(on_error, on_trial_answered)
    return channel


async def _set_up(channel: Channel, setup: Setup, time_limit: float) -> None:
    """Run ``setup`` on a new channel within ``time_limit``; on any failure close the channel
    and raise `ConnectError` (phase ``"setup"``), or the cancellation as it is."""
    name = str(channel.endpoint)
    misuse: TypeError | None = None
    try:
        with trio.move_on_after(time_limit) as scope:
            exchange = setup(channel)
            if not inspect.isawaitable(exchange):  # our user's mistake, not the relay's
                misuse = TypeError(f"setup must be an async function, got {setup!r}")
                raise misuse
            await exchange
        if scope.cancelled_caught:
            raise ConnectError(
                name, "setup", f"setup did not finish within connect_timeout={time_limit:g}s"
            )
        unfinished = _left_unfinished(channel)
        if unfinished:
            raise ConnectError(name, "setup", f"setup left the channel {unfinished}")
    except BaseException as exc:
        with trio.CancelScope() as cancelled:  # forcefully, as trio.aclose_forcefully
            cancelled.cancel()
            await channel.aclose()
        if isinstance(exc, Exception) and not isinstance(exc, ConnectError) and exc is not misuse:
            raise ConnectError(
                name, "setup", f"setup failed: {type(exc).__name__}: {_describe(exc)}"
            ) from exc
        raise


def _left_unfinished(channel: Channel) -> str | None:
    """How ``setup`` left a channel unfit to lend, if it did."""
    if channel.spent is not None:
        return f"unusable ({channel.spent})"
    if channel.unanswered:
        return "with a request unanswered (read every reply in setup)"
    if channel.buffered_bytes:
        return f"with {channel.buffered_bytes} bytes unread (read every reply in setup)"
    if not channel.settle():  # a reply waiting in TLS, on the socket, or a message queued
        return "with a reply unread (read every reply in setup)"
    return None


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


async def _handshake(
    ssl_stream: trio.SSLStream[trio.abc.Stream], name: str, ssl_context: ssl.SSLContext
) -> None:
    try:
        await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # trio keeps the ssl.SSLError (or the transport's error) as the cause.
        cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else exc
        if isinstance(cause, ssl.SSLError) and cause.reason in _NO_COMMON_VERSION:
            reason = _no_common_version(ssl_context)
        else:
            reason = _describe(cause)
        raise ConnectError(name, "tls", f"TLS handshake failed: {reason}") from cause
    except OSError as exc:  # a custom transport's own error, passed through as it is
        raise ConnectError(name, "tls", f"TLS handshake failed: {_describe(exc)}") from exc


# OpenSSL's words for "no TLS version both sides accept": the relay's protocol_version
# alert, or (from a relay that ignored our offer) a version we refuse.
_NO_COMMON_VERSION = frozenset({"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"})


def _no_common_version(ssl_context: ssl.SSLContext) -> str:
    """What a version refusal means, in the versions this client offered."""
    lowest, highest = ssl_context.minimum_version, ssl_context.maximum_version
    if lowest == ssl.TLSVersion.MINIMUM_SUPPORTED:
        lowest = ssl.TLSVersion.TLSv1_2  # (a context the pool accepts refuses anything older)
    if highest == ssl.TLSVersion.MAXIMUM_SUPPORTED:
        highest = ssl.TLSVersion.TLSv1_3
    offered = [
        v for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3) if lowest <= v <= highest
    ]
    if offered == [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]:
        return "the relay offers no TLS 1.2 or 1.3 (older versions are refused as insecure)"
    if offered == [ssl.TLSVersion.TLSv1_3]:
        return "the relay offers no TLS 1.3, the only version ssl_context accepts"
    return "the relay offers no TLS 1.2, the only version ssl_context accepts"


def _describe(exc: BaseException) -> str:
    # trio.open_tcp_stream reports "all attempts to connect to HOST:PORT failed", keeping
    # each address's error ("Error connecting to ('ip', port): ...") in a group behind it.
    # The relay is named once already: say only why, which is what the reader needs.
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and group.exceptions:
        return "; ".join(dict.fromkeys(_why(inner) for inner in group.exceptions))
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _why(exc: BaseException) -> str:
    """One address's failure to connect, without the address: the OS's words for its
    errno (trio's text repeats the address)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return _describe(exc)
