"""A `LoopbackRelay`'s ``wss://`` side: the upgrade, then a session for the handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ._faults import Fault
from ._streams import RelayStream

if TYPE_CHECKING:
    from ._relay import LoopbackRelay

WebSocketHandler = Callable[[WebSocketConnection], Awaitable[None]]

#: Seconds a session's close handshake may take before the connection goes.
CLOSE_TIMEOUT = 1.0


async def echo_messages(session: WebSocketConnection) -> None:
    """The default ``wss://`` handler: send back each message, until the session ends."""
    while True:
        await session.send_message(await session.get_message())


async def serve_session(
    relay: LoopbackRelay, stream: RelayStream, handler: WebSocketHandler
) -> str:
    """Take the upgrade on ``stream`` and run ``handler`` on the session; how it ended."""
    async with trio.open_nursery() as nursery:  # for the session's reader task
        try:
            return await _upgrade_and_serve(relay, stream, handler, nursery)
        finally:
            # A close of ours (the handler returned, or close_sessions) ends with the
            # client's answer, which the reader task takes: let it, for a while.
            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT


async def _upgrade_and_serve(
    relay: LoopbackRelay, stream: RelayStream, handler: WebSocketHandler, nursery: trio.Nursery
) -> str:
    stream.upgrading = True
    with trio.CancelScope() as upgrade:
        # A client that leaves before its upgrade request is whole ends the wait.
        watcher = await nursery.start(_cancel_when_set, stream.ended, upgrade)
        request = await wrap_server_stream(nursery, stream)
    watcher.cancel()
    if upgrade.cancelled_caught:
        return "before_upgrade"
    relay.upgrades += 1
    relay.request_paths.append(request.path)
    relay.request_headers = {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers
    }
    relay.offered_subprotocols = tuple(request.proposed_subprotocols)
    try:
        if relay.fault is Fault.REJECT_UPGRADE:
            await request.reject(403, body=b"rejected, as the test asked")
            return "rejected"
        if relay.fault is Fault.HANG_AFTER_HANDSHAKE:
            await stream.ended.wait()  # read, never answered, until the client goes
            return "before_upgrade"
        offered = relay.subprotocol in relay.offered_subprotocols
        session = await request.accept(subprotocol=relay.subprotocol if offered else None)
    except ConnectionClosed:
        return "before_upgrade"  # the client left during the upgrade
    stream.upgrading = False  # from here on, faults and latency meet the session
    relay.register_session(session, stream)
    try:
        await handler(session)
    except ConnectionClosed as exc:
        code = int(exc.reason.code) if exc.reason else 1006
        relay.close_codes[code] += 1
        if code != 1006:
            return "ws_close"
    finally:
        relay.forget_session(session)
    with trio.move_on_after(CLOSE_TIMEOUT):
        await session.aclose()  # (at once if the session is closed already)
    return "handler_returned"


async def _cancel_when_set(
    event: trio.Event,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as watching:
        task_status.started(watching)
        await event.wait()
        scope.cancel()
