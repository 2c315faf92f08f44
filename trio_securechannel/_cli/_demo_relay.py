"""The demo's relay: the testing kit's `LoopbackRelay` (raw TLS, or WebSocket over the same
TLS), echoing, and misbehaving as the demo's ``--fault`` says."""

from __future__ import annotations

import random
from typing import Any, Literal

import trio
import trustme
from trio_websocket import WebSocketConnection

from ..testing import LoopbackRelay, RelayStream

Fault = Literal["none", "flaky", "down", "slow"]

#: ``down``: the relay's cycle, seconds up then seconds down.
UP_FOR, DOWN_FOR = 3.0, 4.0
#: ``flaky``: the share of requests answered with a reset.
FLAKY_RATE = 0.03
#: ``slow``: every third connection answers this late.
SLOW_DELAY = 0.120


class DemoRelay:
    """Echoes what it receives; misbehaves as its ``fault`` says."""

    def __init__(self, fault: Fault, *, websocket: bool = False) -> None:
        self.fault = fault
        ca = trustme.CA(organization_name="trio-securechannel demo (throwaway)")
        handler: Any = self._echo_messages if websocket else self._echo
        self.relay = LoopbackRelay(handler, websocket=websocket, ca=ca)
        self._connections = 0
        self._random = random.Random(2026)

    @property
    def port(self) -> int:
        return self.relay.port

    def client_context(self) -> Any:
        """A client context trusting only this relay's throwaway CA."""
        return self.relay.client_context()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.relay.serve)
            if self.fault == "down":
                nursery.start_soon(self._go_down_now_and_then)
            task_status.started(self.relay.port)

    async def _go_down_now_and_then(self) -> None:
        while True:
            await trio.sleep(UP_FOR)
            self.relay.stop()  # connects refused, every connection reset
            await trio.sleep(DOWN_FOR)
            self.relay.restart()

    def _slow_connection(self) -> bool:
        self._connections += 1
        return self.fault == "slow" and self._connections % 3 == 0

    async def _echo(self, stream: RelayStream) -> None:
        slow = self._slow_connection()
        while data := await stream.receive_some():
            if self._flaky_now():
                stream.reset()
                return
            if slow:
                await trio.sleep(SLOW_DELAY)
            await stream.send_all(data)

    async def _echo_messages(self, session: WebSocketConnection) -> None:
        slow = self._slow_connection()
        while True:
            message = await session.get_message()
            if self._flaky_now():
                self.relay.reset(session)
                return
            if slow:
                await trio.sleep(SLOW_DELAY)
            await session.send_message(message)

    def _flaky_now(self) -> bool:
        return self.fault == "flaky" and self._random.random() < FLAKY_RATE
