"""The pool's background upkeep: warm spares for ``min_idle`` and the periodic cleanup pass."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, final

import trio

from ._errors import PoolClosed, SecureChannelError

if TYPE_CHECKING:
    from ._channel import SecureChannel
    from ._pool import SecureChannelPool

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

    def __init__(self, pool: SecureChannelPool) -> None:
        self._pool = pool
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
        if self._wakeup and self.spares_missing() > 0:
            self._wakeup.unpark_all()

    async def _keep_spares(self) -> None:
        slots = self._pool._slots
        async with trio.open_nursery() as nursery:
            while True:
                if trio.current_time() < self._retry_spares_at:
                    await trio.sleep_until(self._retry_spares_at)
                while (
                    self.spares_missing() > 0
                    and self._opening_spares < SPARE_CONCURRENCY
                    and slots.reserve_spare()
                ):
                    self._opening_spares += 1
                    nursery.start_soon(self._open_spare)
                await self._wakeup.park()

    async def _open_spare(self) -> None:
        try:
            await self._pool.open_in_reserved_slot(lend=False)
        except PoolClosed:
            pass
        except SecureChannelError as exc:
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

        Closes channels past ``max_lifetime``, channels idle longer than ``idle_timeout``
        (longest idle first, never below ``min_idle``) and channels whose peer sent
        something while idle (closed the connection, reset it, or sent stray data).
        """
        pool = self._pool
        slots, config = pool._slots, pool.config
        now = trio.current_time()
        doomed: list[tuple[SecureChannel, str]] = []
        suspects: list[SecureChannel] = []
        keepers: list[SecureChannel] = []
        for channel in slots.idle:  # longest idle first
            if config.max_lifetime is not None and now - channel.opened_at >= config.max_lifetime:
                doomed.append((channel, "lifetime"))
            elif channel.has_pending_input():
                suspects.append(channel)
            else:
                keepers.append(channel)
        surplus = len(keepers) - config.min_idle
        for channel in keepers:
            if surplus <= 0:
                break
            if now - channel.idle_since >= config.idle_timeout:
                doomed.append((channel, "idle"))
                surplus -= 1
        for channel, _ in doomed:
            slots.forget(channel)
        for channel in suspects:
            slots.take_idle(channel)
        async with trio.open_nursery() as nursery:
            for channel, reason in doomed:
                nursery.start_soon(self._close, channel, reason)
            for channel in suspects:
                nursery.start_soon(self._recheck, channel)

    async def _close(self, channel: SecureChannel, reason: str) -> None:
        await self._pool._retire(channel, reason, graceful=True)

    async def _recheck(self, channel: SecureChannel) -> None:
        """Read what arrived on an idle channel; keep it only if that was TLS housekeeping."""
        pool = self._pool
        try:
            fit = await channel.settle_pending_input()
        except BaseException:
            pool._slots.forget(channel)
            await pool._retire(channel, "aborted", graceful=False)
            raise
        if fit and not pool._slots.closed:
            pool._slots.give_back(channel)
        else:
            pool._slots.forget(channel)
            await pool._retire(channel, "stale", graceful=False)
