"""A relay's background upkeep: warm spares for ``min_idle``, the periodic cleanup pass,
and the WebSocket keepalive.

Only timing lives here (when to open spares, how to back off, when to clean); what to
open or close is the planner's decision, reached through the relay's named operations.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, final

import trio

from ._breaker import BreakerState
from ._errors import CircuitOpen, ConnectError, PoolClosed

if TYPE_CHECKING:
    from ._planner import Open
    from ._relay import Relay
    from ._websocket import WebSocketChannel

logger = logging.getLogger("trio_securechannel")

# Spares are opened a few at a time: a pool that starts (or loses its channels) must not
# fire a storm of simultaneous handshakes at its relay.
SPARE_CONCURRENCY = 4
# After a failed spare, wait before the next: 0.5 s, doubling up to 30 s, reset on success.
SPARE_BACKOFF_FIRST = 0.5
SPARE_BACKOFF_MAX = 30.0


@final
class Upkeep:
    """Keeps ``min_idle`` spares open and runs a cleanup pass every ``cleanup_interval``."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._min_idle = relay.config.min_idle
        self._wakeup = trio.lowlevel.ParkingLot()
        self._opening_spares = 0
        self._spare_failures = 0
        self._retry_spares_at = -float("inf")

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._keep_spares)
        nursery.start_soon(self._clean_periodically)

    def notice_change(self) -> None:
        """The books or the breaker changed: wake the spare keeper if it has work."""
        if self._min_idle and self._wakeup and self._relay.spares_missing(self._opening_spares) > 0:
            self._wakeup.unpark_all()

    def relay_is_back(self) -> None:
        """The breaker closed: whatever spares failed before, open them now."""
        self._forget_failures()
        self.notice_change()

    def _forget_failures(self) -> None:
        self._spare_failures = 0
        self._retry_spares_at = -float("inf")

    async def _keep_spares(self) -> None:
        relay = self._relay
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                if now < self._retry_spares_at:
                    # Backing off, whatever the breaker says (a spare trial that fails
                    # must not be retried at once); a relay that is back (`relay_is_back`)
                    # ends it early.
                    with trio.move_on_at(self._retry_spares_at):
                        await self._wakeup.park()
                    continue
                # While spares fail, probe one at a time rather than a few at once.
                concurrency = 1 if self._spare_failures else SPARE_CONCURRENCY
                for decision in relay.plan_spares(self._opening_spares, concurrency):
                    self._opening_spares += 1
                    nursery.start_soon(self._open_spare, decision)
                await self._wakeup.park()

    async def _open_spare(self, decision: Open) -> None:
        try:
            await self._relay.open_spare(decision)
        except (PoolClosed, CircuitOpen):
            pass  # closing, or the breaker opened since this spare was planned: no connect
        except Exception as exc:  # whatever it is, a spare's failure must not end the pool
            self._spare_failures += 1
            doublings = min(self._spare_failures - 1, 16)  # (2**1024 would overflow a float)
            backoff = min(SPARE_BACKOFF_MAX, SPARE_BACKOFF_FIRST * 2**doublings)
            breaker = self._relay.breaker
            if breaker.state is BreakerState.OPEN:
                backoff = 0.0  # its cooldown spaces the next attempt (a trial) already
            self._retry_spares_at = trio.current_time() + backoff
            retry = f"retry in {backoff:g}s" if backoff else "retry after the breaker's cooldown"
            logger.warning(
                "could not open a spare channel (%s): %s", retry, exc,
                exc_info=not isinstance(exc, ConnectError),  # a bug: show where
            )  # fmt: skip
        else:
            self._forget_failures()
        finally:
            self._opening_spares -= 1
            self._wakeup.unpark_all()

    async def _clean_periodically(self) -> None:
        while True:
            await trio.sleep(self._relay.config.cleanup_interval)
            await self.clean()

    async def clean(self) -> None:
        """One cleanup pass over the idle channels (see `Planner.plan_cleanup`), then a
        ping of the idle WebSocket channels: one whose pong does not come back within
        ``connect_timeout`` is stale."""
        self._relay.clean()
        idle = self._relay.idle_websockets()
        if not idle:
            await trio.lowlevel.checkpoint()
            return
        async with trio.open_nursery() as nursery:
            for channel in idle:
                nursery.start_soon(_keep_alive, channel, self._relay.config.connect_timeout)
        # A channel lent out meanwhile carries its verdict (spent) back with it.
        self._relay.evict_spent_idle()


async def _keep_alive(channel: WebSocketChannel, patience: float) -> None:
    """Ping. A ping that fails or times out leaves the channel spent ("stale"), so it is
    never lent again; one closed meanwhile (a checkout found it unfit) is spent too."""
    with (
        trio.move_on_after(patience),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await channel.ping()
