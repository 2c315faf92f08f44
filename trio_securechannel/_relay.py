"""One relay's side of a pool: its channels, books, breaker, spares and figures.

A pool has a `Relay` per target. Everything here concerns that one relay: checkout from
its channels (the fast path, the general path, waiting in line, breaker trials), giving
back, closing, and shutdown. Choosing among relays is the pool's business (`_pool`).
"""

from __future__ import annotations

import logging
import math
import ssl
from functools import partial
from typing import Any, final

import trio

from ._breaker import BreakerEvent, BreakerState, CircuitBreaker, Trial
from ._channel import Channel
from ._config import PoolConfig
from ._connect import open_channel
from ._endpoint import Endpoint
from ._errors import CircuitOpen, ConnectError, PoolClosed, PoolExhausted
from ._events import EventBus
from ._latency import Histogram
from ._slots import CLOSED, Grant, Slots
from ._stats import PoolStats
from ._upkeep import Upkeep

logger = logging.getLogger("trio_securechannel")


@final
class Relay:
    """A bounded set of TLS channels to one relay, with its own breaker and figures.

    Attributes:
        endpoint: The relay.
        config: The pool's options (``max_connections`` and ``min_idle`` are per relay).
        ssl_context: The client context every handshake uses.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        config: PoolConfig,
        ssl_context: ssl.SSLContext,
        *,
        breaker_events: EventBus[BreakerEvent],
        events: EventBus[dict[str, Any]],
        nursery: trio.Nursery,
    ) -> None:
        self.endpoint = endpoint
        # The pool's nursery: WebSocket channels' reader tasks run there.
        self._nursery = nursery
        self.config = config
        self.ssl_context = ssl_context
        self._slots = Slots(config.max_connections)
        self._breaker = CircuitBreaker(
            str(endpoint),
            failure_threshold=config.breaker_failure_threshold,
            cooldown=config.breaker_cooldown,
            half_open_trials=config.breaker_half_open_trials,
            trial_timeout=config.connect_timeout,
            on_transition=self._breaker_moved,
        )
        self._breaker_events = breaker_events  # the pool's: shared by all its relays
        self._upkeep = Upkeep(self)
        self._drained = trio.lowlevel.ParkingLot()  # shutdown waits here for lent channels
        self._stats = PoolStats(trio.current_time(), config.histogram_rotation_interval)
        # Channel and breaker events as JSON-ready dicts, for the /events stream.
        self._events = events
        # Recent round trips of this relay (an exponential average, seconds), for choosing
        # among relays; None until one was measured. Learned only in a pool of several.
        self.latency_estimate: float | None = None
        self.learns_latency = False

    def __repr__(self) -> str:
        slots = self._slots
        return (
            f"<Relay {self.endpoint} idle={len(slots.idle)}"
            f" in_use={len(slots.in_use)} max={slots.max_connections}"
            f"{' closed' if slots.closed else ''}>"
        )

    @property
    def healthy(self) -> bool:
        """True while at least one channel is established; False before and once empty."""
        return self._slots.open_count > 0

    @property
    def breaker_state(self) -> BreakerState:
        """The relay's circuit breaker state."""
        return self._breaker.state

    def channels(self) -> list[Channel]:
        """The pool's open channels, idle and lent out."""
        return [*self._slots.idle, *self._slots.in_use]

    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the pool's state, counters and latencies."""
        slots, stats = self._slots, self._stats
        now = trio.current_time()
        live = self.channels()
        errors = stats.errors(slots.in_use)
        return {
            "target": str(self.endpoint),
            "protocol": "websocket" if self.endpoint.is_websocket else "tls",
            "healthy": self.healthy,
            "closed": slots.closed,
            "connections": {
                "idle": len(slots.idle),
                "in_use": len(slots.in_use),
                "opening": slots.opening,
                "waiting": len(slots.waiters),
                "max": slots.max_connections,
                "min_idle": self.config.min_idle,
                "opened_total": stats.opened_total,
                "closed_total": sum(stats.closed_by_reason.values()),
                "closed_by_reason": dict(stats.closed_by_reason),
            },
            "breaker": self._breaker.status(now),
            "errors_total": sum(errors.values()),
            "errors_by_kind": dict(errors),
            "pool_exhausted_total": stats.exhausted_total,
            "bytes_sent_total": stats.bytes_sent(live),
            "bytes_received_total": stats.bytes_received(live),
            "latency": {
                "handshake": stats.handshakes.recent().summary(),
                "round_trip": stats.round_trips_recent(live).summary(),
                "acquire_wait": stats.acquire_waits.recent().summary(),
            },
            "channels": [
                {
                    "id": channel.id,
                    "state": "in_use" if channel in slots.in_use else "idle",
                    "age_s": round(now - channel.opened_at, 3),
                    "handshake_ms": _ms(channel.handshake_seconds),
                    "round_trip": channel.round_trips.recent().summary(),
                }
                for channel in live
            ],
        }

    # -- checkout -------------------------------------------------------------------------

    def _take_warm_channel(self) -> Channel | None:
        """The fast path, synchronous: the warmest idle channel if it is fit, else None.

        None sends the checkout down the general path (`_checkout`), which handles an
        open breaker, unfit channels, opening and waiting.
        """
        slots = self._slots
        if not slots.idle or slots.waiters or slots.closed:
            return None
        if self._breaker.state is not BreakerState.CLOSED:
            return None
        if self._unfit_reason(slots.idle[-1]) is not None:
            return None
        channel = slots.idle.pop()
        slots.in_use.add(channel)
        self._stats.acquire_waits.observe_zero()
        self._upkeep.notice_change()
        return channel

    async def _checkout(self) -> Channel:
        """The general path; the caller has already checked for cancellation."""
        if self._slots.closed:
            raise PoolClosed(str(self.endpoint))
        if self._breaker.state is not BreakerState.CLOSED:
            trial = self._breaker.admit(trio.current_time())  # CircuitOpen: no socket touched
            if trial is not None:
                return await self._checkout_trial(trial)
        grant = self._slots.try_take()
        if grant is None:
            began = trio.current_time()
            grant = await self._wait_turn()
            self._stats.acquire_waits.observe(trio.current_time() - began)
        else:
            self._stats.acquire_waits.observe_zero()
        self._upkeep.notice_change()
        if isinstance(grant, Channel) and self._breaker.state is not BreakerState.CLOSED:
            # It opened while this checkout waited in line: this checkout started before
            # the opening, but it still gets no traffic through without the breaker's leave.
            return await self._checkout_after_opening(grant)
        while isinstance(grant, Channel):
            unfit = self._unfit_reason(grant)
            if unfit is None:
                await trio.lowlevel.cancel_shielded_checkpoint()  # yield at least once
                return grant
            dead, grant = grant, self._slots.swap_dead(grant)
            await self._retire(dead, unfit, graceful=False)
            if isinstance(grant, Channel) and grant not in self._slots.in_use:
                grant = CLOSED  # a shutdown out of time closed it while we closed the other
        if grant is CLOSED:
            raise PoolClosed(str(self.endpoint))
        trial = None
        if self._breaker.state is not BreakerState.CLOSED:
            # It opened while this checkout waited in line: no connect without its leave.
            try:
                trial = self._breaker.admit(trio.current_time())
            except CircuitOpen:
                self._slots.open_failed()
                self._released()
                raise
        return await self.open_in_reserved_slot(trial=trial)

    async def _checkout_after_opening(self, channel: Channel) -> Channel:
        """A waiter was handed ``channel`` but the breaker is no longer closed."""
        try:
            trial = self._breaker.admit(trio.current_time())
        except CircuitOpen:
            if self._slots.closed:
                self._slots.forget(channel)
                await self._retire(channel, "shutdown", graceful=True)
            else:
                self._slots.give_back(channel)  # to the next in line, or idle
            raise
        assert trial is not None  # not CLOSED: admit gives a trial or refuses
        self._slots.trade_for_slot(channel)  # a trial runs on a fresh channel
        await self._retire(channel, "trial", graceful=True)
        return await self.open_in_reserved_slot(trial=trial)

    async def _checkout_trial(self, trial: Trial) -> Channel:
        """A half-open breaker's trial: always on a freshly opened channel."""
        try:
            if not await self.reserve_fresh_slot():
                grant = await self._wait_turn()  # every slot is lent: wait like anyone
                if grant is CLOSED:
                    raise PoolClosed(str(self.endpoint))
                if isinstance(grant, Channel):  # a trial must not reuse one
                    self._slots.trade_for_slot(grant)
                    await self._retire(grant, "trial", graceful=True)
        except BaseException:
            self._breaker.trial_abandoned(trial)
            raise
        return await self.open_in_reserved_slot(trial=trial)

    async def reserve_fresh_slot(self) -> bool:
        """Reserve a slot for a brand-new channel (a trial's), evicting an idle one if need be."""
        reserved, evicted = self._slots.reserve_fresh()
        if evicted is not None:
            await self._retire(evicted, "trial", graceful=False)
        return reserved

    async def _wait_turn(self) -> Channel | Grant:
        """Wait in line for a channel or a slot, for up to ``acquire_timeout``.

        The waiter parks its task directly (no event, and no cancel scope when the wait
        is unbounded): granting reschedules it with the grant, which it then owns.
        """
        timeout = self.config.acquire_timeout
        if timeout > 0:
            slots = self._slots
            waiter = slots.enqueue(trio.lowlevel.current_task())

            def abort(_: Any) -> trio.lowlevel.Abort:
                # Only called while nothing was granted: a grant reschedules the task first.
                slots.leave_line(waiter)
                return trio.lowlevel.Abort.SUCCEEDED

            if timeout == math.inf:
                grant: Channel | Grant = await trio.lowlevel.wait_task_rescheduled(abort)
                return grant
            with trio.move_on_after(timeout):
                grant = await trio.lowlevel.wait_task_rescheduled(abort)
                return grant
        self._stats.exhausted_total += 1
        raise PoolExhausted(str(self.endpoint), self.config.max_connections, timeout)

    def _unfit_reason(self, channel: Channel) -> str | None:
        """Why an idle channel must not be lent (None: fit). One poll() when all is well.

        Anything the relay sent while the channel sat idle (end-of-file, a reset, a reply
        nobody read, data it pushed unasked) makes it unfit: the next user must start at
        a clean message boundary, and there is no telling where one is.
        """
        max_lifetime = self.config.max_lifetime
        if max_lifetime is not None and trio.current_time() - channel.opened_at >= max_lifetime:
            return "lifetime"
        if channel.spent is not None:
            return channel.spent  # e.g. closed by a user who kept a reference
        return "stale" if channel.has_pending_input() else None

    async def open_in_reserved_slot(self, *, trial: Trial | None = None) -> Channel:
        """Open a channel in a slot already reserved in the books; free the slot on failure.

        The caller holds the new channel. The outcome is the breaker's to judge, before
        the caller sees it.

        Raises:
            CircuitOpen: The breaker opened since the slot was reserved, and this is no
                trial: the slot is freed without touching the network.
        """
        if trial is None and self._breaker.state is not BreakerState.CLOSED:
            self._slots.open_failed()
            self._released()
            raise CircuitOpen(
                str(self.endpoint), self._breaker.retry_after(trio.current_time()) or 0.0
            )
        try:
            channel = await open_channel(
                self.endpoint,
                self.ssl_context,
                self.config,
                on_error=self._channel_failed,
                nursery=self._nursery,
            )
        except BaseException as exc:
            self._slots.open_failed()
            if isinstance(exc, ConnectError) and self._slots.closed:
                # Cut short by the pool's own exit (e.g. the nursery a WebSocket reader
                # needs is gone): no fault of the relay's.
                if trial is not None:
                    self._breaker.trial_abandoned(trial)
                self._released()
                raise PoolClosed(str(self.endpoint)) from exc
            if isinstance(exc, ConnectError):
                self._stats.connect_failed(exc.phase)
                self._breaker.failed(trio.current_time(), exc.reason, trial)
            elif trial is not None:
                self._breaker.trial_abandoned(trial)  # cancelled: neither success nor failure
            self._released()
            raise
        self._breaker.connected(trio.current_time(), trial)
        self._stats.channel_opened(channel)
        self._slots.opened(channel)
        logger.debug("opened %r", channel)
        self._events.publish(
            {
                "type": "channel_opened",
                "endpoint": str(self.endpoint),
                "channel": channel.id,
                "handshake_ms": _ms(channel.handshake_seconds),
            }
        )
        if self._slots.closed:
            self._slots.forget(channel)
            await self._retire(channel, "shutdown", graceful=True)
            raise PoolClosed(str(self.endpoint))
        return channel

    async def add_spare(self, channel: Channel) -> None:
        """Pool a freshly opened channel nobody asked for yet, once it is quiet."""
        try:
            await channel.absorb_handshake_tail()
        except BaseException:
            self._slots.forget(channel)
            await self._retire(channel, "aborted", graceful=False)
            raise
        reason = self._give_back(channel, served=False)
        if reason is not None:
            await self._retire(channel, reason, graceful=True)

    # -- give-back and closing ------------------------------------------------------------

    def _channel_failed(self, channel: Channel, kind: str) -> None:
        """A lent channel hit an I/O error: the breaker hears of it before its user does."""
        if self.learns_latency:
            # Choosing among relays, an error weighs as a round trip of connect_timeout
            # (before the breaker hears of it: opening, it forgets the estimate).
            self._observe_latency(self.config.connect_timeout)
        self._breaker.failed(trio.current_time(), f"{kind} error on {channel!r}", in_session=True)

    def _give_back(self, channel: Channel, *, served: bool = True) -> str | None:
        """The lease ended normally (or a spare is ready, ``served=False``): keep the
        channel, or say why it must be closed."""
        now = trio.current_time()
        if served and self._breaker.consecutive_failures and _served_well(channel):
            self._breaker.succeeded(now)  # (a success changes nothing when none failed)
        slots = self._slots
        if channel not in slots.in_use:
            return None  # already force-closed by a shutdown that ran out of time
        max_lifetime = self.config.max_lifetime
        if slots.closed:
            reason: str | None = "shutdown"
        elif channel.spent is not None:
            reason = channel.spent
        elif channel.unanswered:
            reason = "unanswered"
        elif max_lifetime is not None and now - channel.opened_at >= max_lifetime:
            reason = "lifetime"
        else:
            channel.idle_since = now
            if self.learns_latency:
                self._learn_latency(channel)
            slots.give_back(channel)
            return None
        slots.forget(channel)
        return reason

    def _learn_latency(self, channel: Channel) -> None:
        """Fold the round trips this lease made into the relay's estimate (once each)."""
        fresh = channel.round_trips_total - channel.round_trips_reported
        if fresh <= 0:
            return
        channel.round_trips_reported = channel.round_trips_total
        latest = channel.recent_round_trip()
        if latest is not None:
            self._observe_latency(latest)

    def _observe_latency(self, seconds: float) -> None:
        previous = self.latency_estimate
        self.latency_estimate = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    def has_room(self) -> bool:
        """Whether a checkout here would be served without waiting in line."""
        slots = self._slots
        if slots.closed or slots.waiters:
            return False
        return bool(slots.idle) or slots.total < slots.max_connections

    def admits(self, now: float) -> bool:
        """Whether a checkout here would get past the breaker (without asking it)."""
        breaker = self._breaker
        if breaker.state is BreakerState.CLOSED:
            return True
        if breaker.state is BreakerState.OPEN:
            return now >= breaker.open_until
        return breaker.trial_available()

    def recent_histograms(self) -> tuple[Histogram, Histogram, Histogram]:
        """Recent handshake, round-trip and acquire-wait histograms, for `status()`."""
        stats = self._stats
        return (
            stats.handshakes.recent(),
            stats.round_trips_recent(self.channels()),
            stats.acquire_waits.recent(),
        )

    async def _discard(self, channel: Channel, exc: BaseException | None) -> None:
        """The lease ended with an exception or a cancellation: never reuse the channel."""
        if _served_well(channel) and not isinstance(exc, trio.Cancelled):
            # The application's own error: the relay did its part.
            self._breaker.succeeded(trio.current_time())
        if channel not in self._slots.in_use:
            return
        self._slots.forget(channel)
        await self._retire(channel, "error" if channel.errors else "aborted", graceful=False)

    async def _retire(self, channel: Channel, reason: str, *, graceful: bool) -> None:
        """Account for a channel that has left the books, then close it."""
        self.account_for_departure(channel, reason)
        await self.close_departed(channel, graceful=graceful)

    def account_for_departure(self, channel: Channel, reason: str) -> None:
        """Fold a departed channel's figures into the pool's, in the same step that took
        it off the books: totals must never dip while its close is still pending."""
        self._stats.channel_closed(channel, reason)
        self._released()
        self._events.publish(
            {
                "type": "channel_closed",
                "endpoint": str(self.endpoint),
                "channel": channel.id,
                "reason": reason,
            }
        )
        logger.debug("closing %r (%s)", channel, reason)

    async def close_departed(self, channel: Channel, *, graceful: bool) -> None:
        """Close a channel already accounted for. Never raises; bounded in time.

        Graceful: a TLS close_notify within ``shutdown_timeout``. Otherwise (the channel
        may be mid-record, or its peer gone) the socket is closed at once.
        """
        with trio.CancelScope(shield=True) as scope:
            if graceful:
                scope.deadline = trio.current_time() + self.config.shutdown_timeout
            else:
                scope.cancel()  # SSLStream.aclose then closes the socket without a goodbye
            try:
                await channel.aclose()
            except (trio.BrokenResourceError, OSError) as exc:
                logger.debug("closing %r: %r", channel, exc)

    async def run_background(self) -> None:
        """The relay's own tasks: spares, cleanup passes and the breaker's timer."""
        async with trio.open_nursery() as nursery:
            self._upkeep.start(nursery)
            nursery.start_soon(self._breaker.run)

    def _breaker_moved(self, event: BreakerEvent) -> None:
        """Told of each breaker transition as it happens, before anyone sees its cause."""
        self._breaker_events.publish(event)
        self._events.publish({"type": "breaker", **event.as_dict()})
        if event.to_state is BreakerState.OPEN:
            self.latency_estimate = None  # when it is back, it is found out afresh
        self._upkeep.notice_change()

    def _released(self) -> None:
        """A channel or a slot left the books: whoever waits for that may go on."""
        if self._slots.closed:
            self._drained.unpark_all()
        else:
            self._upkeep.notice_change()

    async def shutdown(self) -> None:
        """Stop lending, close idle channels gracefully, wait (bounded) for lent ones."""
        slots = self._slots
        deadline = trio.current_time() + self.config.shutdown_timeout
        with trio.CancelScope(shield=True, deadline=deadline):
            idle = slots.close()
            for channel in idle:
                self.account_for_departure(channel, "shutdown")
            async with trio.open_nursery() as nursery:
                for channel in idle:
                    nursery.start_soon(partial(self.close_departed, channel, graceful=True))
            while slots.in_use or slots.opening:
                await self._drained.park()
        # Out of time: close what is still lent out under its users' feet.
        for channel in list(slots.in_use):
            slots.forget(channel)
            await self._retire(channel, "shutdown", graceful=False)


def _served_well(channel: Channel) -> bool:
    """Whether a lease's channel shows the relay did its part: no I/O error, its last
    request answered, nothing cut short (a cancelled send or receive, a failed ping)."""
    return not channel.errors and not channel.unanswered and channel.spent in (None, "slow")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
