"""Closing channels that left the books, without holding anyone up.

A forced close (the channel may be mid-record, or its peer gone) finishes at once. A
graceful one (a TLS close_notify, a WebSocket close frame) may wait on the relay, so it runs
in the pool's nursery, bounded by ``shutdown_timeout``, never in the task that gave the
channel back: leaving a block is bounded by the caller's own deadline, not the relay's.
"""

from __future__ import annotations

import logging
from typing import final

import trio

from ._channel import Channel

logger = logging.getLogger("trio_securechannel")


@final
class Closer:
    """Closes departed channels in the pool's nursery; the shutdown waits for them."""

    def __init__(self, nursery: trio.Nursery, grace: float) -> None:
        self._nursery = nursery
        self._grace = grace
        self._pending = 0  # closes handed over and not finished (started or not)
        self._scopes: set[trio.CancelScope] = set()  # those started
        self._cut = False
        self._done = trio.lowlevel.ParkingLot()

    def close_soon(self, channel: Channel, *, graceful: bool) -> None:
        """Close ``channel``: to its holder at once, to the relay in the pool's nursery
        (with a goodbye, or at once)."""
        channel.mark_closed()
        self._pending += 1
        try:
            self._nursery.start_soon(self._close, channel, graceful)
        except RuntimeError:  # the pool's nursery is gone: a system task closes it
            trio.lowlevel.spawn_system_task(self._close, channel, False)

    async def wait_closed(self) -> None:
        """Wait until every close handed over has finished (bound it with a deadline)."""
        while self._pending:
            await self._done.park()

    def cut_short(self) -> None:
        """Out of time: closes under way, or yet to start, finish without their goodbyes."""
        self._cut = True
        for scope in self._scopes:
            scope.cancel()

    async def _close(self, channel: Channel, graceful: bool) -> None:
        with trio.CancelScope(shield=True) as scope:
            if graceful and not self._cut:
                scope.deadline = trio.current_time() + self._grace
            else:
                scope.cancel()  # SSLStream.aclose then closes the socket without a goodbye
            self._scopes.add(scope)
            try:
                await channel.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                logger.debug("closing %r: %r", channel, exc)  # the relay or socket is gone
            except Exception:
                # Background work: whatever a custom transport raises while closing ends
                # this one close, never the pool (nor, after it, the run).
                logger.warning("closing %r failed", channel, exc_info=True)
            finally:
                self._scopes.discard(scope)
                self._pending -= 1
                if not self._pending:
                    self._done.unpark_all()
