"""Opening a channel: TCP connect, TLS handshake and (``wss://``) WebSocket upgrade under one
deadline."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable

import trio

from ._channel import Channel, SecureChannel
from ._config import PoolConfig
from ._endpoint import Endpoint
from ._errors import ConnectError
from ._websocket import UpgradeFailed, WebSocketChannel, upgrade

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def open_channel(
    endpoint: Endpoint,
    ssl_context: ssl.SSLContext,
    config: PoolConfig,
    *,
    on_error: Callable[[Channel, str], None] | None = None,
    nursery: trio.Nursery | None = None,
) -> Channel:
    """Connect to ``endpoint`` and complete a verified TLS handshake, within
    ``config.connect_timeout`` (over ``config.open_transport`` when set).

    For a ``wss://`` endpoint the WebSocket upgrade follows, within the same timeout, with
    ``config``'s ``websocket_*`` options; its reader task is started in ``nursery``.
    Whatever happens before the channel is ready (an error, a timeout, a cancellation),
    the half-made connection is closed before this returns or raises.

    Raises:
        ConnectError: TCP, DNS, TLS or WebSocket upgrade failure, or ``connect_timeout``
            ran out.
    """
    opener = config.open_transport or trio.open_tcp_stream
    name = str(endpoint)
    connection = None
    try:
        # A handshake without a deadline hangs forever on a peer that never speaks TLS.
        with trio.fail_after(config.connect_timeout):
            transport = await opener(endpoint.host, endpoint.port)
            try:
                handshake_began = trio.current_time()
                ssl_stream = trio.SSLStream(transport, ssl_context, server_hostname=endpoint.host)
                await ssl_stream.do_handshake()
                if endpoint.is_websocket:
                    if nursery is None:
                        raise RuntimeError("a WebSocket channel needs a nursery for its reader")
                    connection = await upgrade(ssl_stream, endpoint, nursery, config)
            except BaseException:
                await trio.aclose_forcefully(transport)
                raise
    except trio.TooSlowError:
        session = "WebSocket" if endpoint.is_websocket else "TLS"
        raise ConnectError(
            name,
            "timeout",
            f"no {session} session within connect_timeout={config.connect_timeout:g}s",
        ) from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else exc
        raise ConnectError(name, "tls", f"TLS handshake failed: {_describe(cause)}") from cause
    except UpgradeFailed as exc:
        raise ConnectError(name, "websocket", str(exc)) from exc.__cause__
    except OSError as exc:
        raise ConnectError(name, "tcp", f"TCP connect failed: {_describe(exc)}") from exc
    except Exception as exc:
        # Whatever else a resolver or a custom transport raises (UnicodeError for a name
        # IDNA cannot encode, ...) is still a failure to connect, reported as one.
        raise ConnectError(name, "tcp", f"cannot connect: {_describe(exc)}") from exc
    handshake_seconds = trio.current_time() - handshake_began
    if connection is not None:
        return WebSocketChannel(
            ssl_stream,
            endpoint,
            connection,
            on_error=on_error,
            handshake_seconds=handshake_seconds,
        )
    return SecureChannel(
        ssl_stream, endpoint, on_error=on_error, handshake_seconds=handshake_seconds
    )


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
