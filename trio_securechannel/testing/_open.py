"""`open_relay`: a `LoopbackRelay` for the length of a block, the Trio way."""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trustme

from ._groups import alone
from ._relay import Handler, LoopbackRelay
from ._websocket import WebSocketHandler

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


@asynccontextmanager
async def open_relay(
    handler: Handler | WebSocketHandler | None = None,
    *,
    websocket: bool = False,
    path: str = "/",
    ca: trustme.CA | None = None,
    tls_context: ssl.SSLContext | None = None,
    listen: bool = True,
) -> AsyncIterator[LoopbackRelay]:
    """Run a `LoopbackRelay` for the block; it stops at the end (its connections closed).

    An error in the block, or one your handler raised, comes out as itself, never in an
    exception group.

    Args:
        handler: What serves each connection (default: echo); see `LoopbackRelay`.
        websocket: Serve ``wss://`` at ``path``.
        path: The WebSocket path.
        ca: The CA that signs the relay's certificate (default: a throwaway one).
        tls_context: A server context of your own instead.
        listen: False: no socket, only `LoopbackRelay.open_memory_stream` reaches it.

    .. code-block:: python

        async with open_relay() as relay, sc.open_pool(
            relay.address, ssl_context=relay.client_context()
        ) as pool:
            relay.fault = Fault.HANG_AFTER_HANDSHAKE
            ...
    """
    relay = LoopbackRelay(handler, websocket=websocket, path=path, ca=ca, tls_context=tls_context)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, relay, listen)
            try:
                yield relay
            except BaseException as exc:
                # Re-raised below, outside the nursery, so it never comes out in a group.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A handler raised: the test sees that exception itself (trio wraps it).
        raise alone(group) from None
    if body_error is not None:
        raise body_error


async def _serve(relay: LoopbackRelay, listen: bool, *, task_status: trio.TaskStatus[None]) -> None:
    await relay.serve(listen=listen, task_status=task_status)
