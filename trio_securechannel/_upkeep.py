"""The pool's background upkeep: warm spares for ``min_idle`` and the periodic cleanup pass."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, final

import trio

from ._breaker import CLOSED, HALF_OPEN, Trial
from ._errors import CircuitOpen, PoolClosed
from ._websocket import WebSocketChannel

if TYPE_CHECKING:
    from ._channel import Channel
    from ._relay import Relay

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
        self._pool = relay  # the relay whose channels this keeps
        self._wakeup = trio.lowlevel.ParkingLot()
        self._opening_spares = 0
        self._spare_failures = 0
        self._retry_spares_at = -float("inf")

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._keep_spares)
        nursery.start_soon(self._clean_periodically)

    def spares_missing(self) -> int:
        pool = self._pool
        return pool.config.min_idle - len(pool._slots.idle) - self._opening_spares

    def notice_change(self) -> None:
        """The books changed: wake the spare keeper if it has something to do."""
        if self._pool.config.min_idle and self._wakeup and self.spares_missing() > 0:
            self._wakeup.unpark_all()

    async def _keep_spares(self) -> None:
        pool = self._pool
        async with trio.open_nursery() as nursery:
            while True:
                state = pool._breaker.state
                if state is CLOSED and trio.current_time() < self._retry_spares_at:
                    await trio.sleep_until(self._retry_spares_at)
                    continue
                if state is CLOSED:
                    # While spares fail, probe one at a time rather than a few at once.
                    concurrency = 1 if self._spare_failures else SPARE_CONCURRENCY
                    while (
                        self.spares_missing() > 0
                        and self._opening_spares < concurrency
                        and pool._slots.reserve_spare()
                    ):
                        self._opening_spares += 1
                        nursery.start_soon(self._open_spare, None)
                elif state is HALF_OPEN and self.spares_missing() > 0 and not self._opening_spares:
                    # Find out whether the relay is back without waiting for traffic (the
                    # breaker's cooldown stands in for the spares' own backoff here).
                    trial = pool._breaker.take_trial(trio.current_time())
                    if trial is not None:
                        if await pool.reserve_fresh_slot():
                            self._opening_spares += 1
                            nursery.start_soon(self._open_spare, trial)
                        else:
                            pool._breaker.trial_abandoned(trial)
                # While open: no connection attempts at all until the cooldown ends.
                await self._wakeup.park()

    async def _open_spare(self, trial: Trial | None) -> None:
        try:
            channel = await self._pool.open_in_reserved_slot(trial=trial)
            await self._pool.add_spare(channel)
        except (PoolClosed, CircuitOpen):
            pass  # closing, or the breaker opened since this spare was planned: no connect
        except Exception as exc:  # whatever it is, a spare's failure must not end the pool
            self._spare_failures += 1
            backoff = min(SPARE_BACKOFF_MAX, SPARE_BACKOFF_FIRST * 2 ** (self._spare_failures - 1))
            self._retry_spares_at = trio.current_time() + backoff
            logger.warning("could not open a spare channel (retry in %gs): %s", backoff, exc)
        else:
            self._spare_failures = 0
        finally:
            self._opening_spares -= 1
            self._wakeup.unpark_all()

    async def _clean_periodically(self) -> None:
        while True:
            await trio.sleep(self._pool.config.cleanup_interval)
            await self.clean()

    async def clean(self) -> None:
        """One cleanup pass over the idle channels.

        Closes channels past ``max_lifetime``, channels whose relay sent something while
        they sat idle (closed the connection, reset it, or pushed data nobody asked for),
        and channels idle longer than ``idle_timeout`` (longest idle first, never below
        ``min_idle``). Then pings the idle WebSocket channels that remain: one whose pong
        does not come back within ``connect_timeout`` is stale.
        """
        pool = self._pool
        slots, config = pool._slots, pool.config
        now = trio.current_time()
        # Forced here, whatever the load, so latency windows never grow past two.
        pool._stats.rotate(now, pool.channels())
        if config.max_latency_ms is not None:
            for channel in slots.in_use:
                if _too_slow(channel, config.max_latency_ms):
                    channel.retire_when_returned("slow")
        doomed: list[tuple[Channel, str]] = []
        keepers: list[Channel] = []
        for channel in slots.idle:  # longest idle first
            reason = pool._unfit_reason(channel)
            if reason is None and config.max_latency_ms is not None:
                reason = "slow" if _too_slow(channel, config.max_latency_ms) else None
            if reason is None:
                keepers.append(channel)
            else:
                doomed.append((channel, reason))
        surplus = len(keepers) - config.min_idle
        for channel in keepers:
            if surplus <= 0:
                break
            if now - channel.idle_since >= config.idle_timeout:
                doomed.append((channel, "idle"))
                surplus -= 1
        for channel, reason in doomed:
            slots.evict_idle(channel)
            pool.account_for_departure(channel, reason)
        async with trio.open_nursery() as nursery:
            for channel, reason in doomed:
                # The relay is gone from a stale channel: no goodbye to wait for.
                nursery.start_soon(
                    partial(pool.close_departed, channel, graceful=reason != "stale")
                )
        await self._ping_idle_websockets()

    async def _ping_idle_websockets(self) -> None:
        """WebSocket keepalive: a relay that stopped answering is found out while idle."""
        pool = self._pool
        idle = [ch for ch in pool._slots.idle if isinstance(ch, WebSocketChannel)]
        if not idle:
            return
        async with trio.open_nursery() as nursery:
            for channel in idle:
                nursery.start_soon(_keep_alive, channel, pool.config.connect_timeout)
        # A channel lent out meanwhile carries its verdict (spent) back with it.
        slots = pool._slots
        silent = [ch for ch in idle if not ch.reusable and ch in slots.idle]
        for channel in silent:
            slots.evict_idle(channel)
            pool.account_for_departure(channel, "stale")
        async with trio.open_nursery() as nursery:
            for channel in silent:
                nursery.start_soon(partial(pool.close_departed, channel, graceful=False))


async def _keep_alive(channel: WebSocketChannel, patience: float) -> None:
    """Ping. A ping that fails or times out leaves the channel spent ("stale"), so it is
    never lent again; one closed meanwhile (a checkout found it unfit) is spent too."""
    with (
        trio.move_on_after(patience),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await channel.ping()


def _too_slow(channel: Channel, max_latency_ms: float) -> bool:
    """Whether the median of the channel's last few round trips is above the limit."""
    recent = channel.recent_round_trip()
    return recent is not None and recent * 1000 > max_latency_ms
