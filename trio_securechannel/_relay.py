"""One relay's side of a pool: the I/O around its planner.

A pool has a `Relay` per target. The planner (`_planner`) decides; the relay acts: it
opens channels in the slots the planner reserved, waits in line when told to, closes what
left the books, and keeps the figures. Its named operations are all the rest of the pool
uses: `try_lend`, `checkout`, `check_in`, `refuse`, `retry_after`, `admits`, `has_room`,
`load` and `snapshot` for checkouts and readers; `plan_spares`, `open_spare`, `clean` and
`evict_spent_idle` for the upkeep; `stop_lending` and `shutdown` for the exit.

The operations that carry a decision of the planner's through to its end (a checkout, a
give-back, a departure) are protected from Ctrl-C as a whole, as trio's own locks are: a
KeyboardInterrupt in between would leave a reserved slot or a departed channel behind, so
it is delivered at the next checkpoint instead.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Iterable
from typing import Any, final

import outcome
import trio
from trio.lowlevel import enable_ki_protection

from ._breaker import BreakerEvent, BreakerState, CircuitBreaker
from ._channel import Channel
from ._closing import Closer
from ._config import PoolConfig
from ._connect import open_channel
from ._endpoint import Endpoint
from ._errors import CircuitOpen, ConnectError, PoolClosed, PoolExhausted
from ._events import EventBus
from ._planner import Closed, Departure, Lend, Open, Planner, Refuse
from ._slots import CLOSED, Grant, Reservation, Slots
from ._snapshot import RelaySnapshot, take_snapshot
from ._stats import PoolStats
from ._upkeep import Upkeep
from ._websocket import WebSocketChannel

logger = logging.getLogger("trio_securechannel")

#: The least time a fresh spare is watched before it is pooled (see `Relay.open_spare`).
SPARE_WATCH_MIN = 0.05


@final
class Relay:
    """A bounded set of TLS channels to one relay, with its own breaker and figures.

    Attributes:
        endpoint: The relay.
        config: The pool's options (``max_connections`` and ``min_idle`` are per relay).
        ssl_context: The client context every handshake uses.
        breaker: The relay's circuit breaker.
        learns_latency: Whether to keep `latency_estimate` (in a pool of several relays).
        latency_estimate: Recent round trips (an exponential average, seconds) for
            choosing among relays; None until one was measured.
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
        self.config = config
        self.ssl_context = ssl_context
        self._name = str(endpoint)
        self._nursery = nursery  # the pool's: WebSocket channels' tasks run there
        self._books = Slots(config.max_connections, on_slot_freed=self._released)
        # How long opening a channel may take: the handshake's connect_timeout, and as
        # long again for the setup exchange, if any.
        self._open_limit = config.connect_timeout * (2 if config.setup is not None else 1)
        self.breaker = CircuitBreaker(
            self._name,
            failure_threshold=config.breaker_failure_threshold,
            cooldown=config.breaker_cooldown,
            half_open_trials=config.breaker_half_open_trials,
            # A trial permit is good for a connect, with as long again to spare: the
            # connect's own timeout, not the permit's end, must decide (a lease with a
            # time limit extends it in the same way).
            trial_timeout=self._open_limit + config.connect_timeout,
            on_transition=self._breaker_moved,
        )
        self._planner = Planner(self._books, self.breaker, config)
        self._closer = Closer(nursery, config.shutdown_timeout)
        self._breaker_events = breaker_events  # the pool's: shared by all its relays
        self._events = events  # channel and breaker events as JSON-ready dicts (/events)
        self._upkeep = Upkeep(self)
        self._keeps_spares = config.min_idle > 0
        self._drained = trio.lowlevel.ParkingLot()  # the shutdown waits here for lent channels
        self._now = trio.lowlevel.current_clock().current_time  # bound once: the hot path
        self._stats = PoolStats(self._now(), config.histogram_rotation_interval)
        self.latency_estimate: float | None = None
        self.learns_latency = False

    def __repr__(self) -> str:
        books = self._books
        return (
            f"<Relay {self.endpoint} idle={len(books.idle)}"
            f" in_use={len(books.in_use)} max={books.max_connections}"
            f"{' closed' if books.closed else ''}>"
        )

    @property
    def closed(self) -> bool:
        """True once the relay stopped lending (the pool is closing)."""
        return self._books.closed

    @property
    def healthy(self) -> bool:
        """True while at least one channel is established."""
        return self._books.open_count > 0

    @property
    def load(self) -> float:
        """For choosing among relays, lower is better: channels busy or opening, times
        recent latency (unknown: 0, so a new or revived relay gets tried)."""
        books = self._books
        return (len(books.in_use) + books.opening + 1) * (self.latency_estimate or 0.0)

    def channels(self) -> list[Channel]:
        """The open channels, idle and lent out."""
        return [*self._books.idle, *self._books.in_use]

    # -- checkout -------------------------------------------------------------------------

    @enable_ki_protection
    def try_lend(self) -> Channel | None:
        """The fast path, synchronous: a warm channel if one is fit and nothing stands in
        its way; None sends the checkout to `checkout`."""
        channel = self._planner.lend_warm()
        if channel is not None:
            self._stats.zero_waits += 1
            if self._keeps_spares:
                self._upkeep.notice_change()  # one spare fewer
        return channel

    @enable_ki_protection
    async def checkout(self, *, began: float | None = None) -> Channel:
        """Plan, act, and plan again until the checkout has a channel or an answer.

        The caller has already checked for cancellation. A wait in line ends
        ``acquire_timeout`` after ``began`` (default: now), so that waits at several
        relays share one.

        Raises:
            PoolExhausted: No channel came free within ``acquire_timeout``.
            CircuitOpen: The breaker refused the checkout; nothing was attempted.
            ConnectError: A new channel was needed and could not be opened.
            PoolClosed: The pool is closing.
        """
        planner = self._planner
        held: Channel | Reservation | None = None
        trial = None
        if began is None:
            began = trio.current_time()
        deadline: float | None = None  # of the wait in line, once there is one
        while True:
            now = trio.current_time()
            decision, departures = planner.plan(now, held, trial)
            self._depart(departures)
            if isinstance(decision, Lend):
                self._waited(began, now, deadline)
                await trio.lowlevel.cancel_shielded_checkpoint()  # yield at least once
                return decision.channel
            if isinstance(decision, Open):
                self._waited(began, now, deadline)
                return await self._open(decision)
            if isinstance(decision, Refuse):
                raise decision.error
            if isinstance(decision, Closed):
                raise PoolClosed(self._name)
            trial = decision.trial  # Wait
            if deadline is None:
                deadline = began + self.config.acquire_timeout
            try:
                grant = await self._wait_turn(deadline)
            except BaseException:
                if trial is not None:
                    self.breaker.trial_abandoned(trial)
                raise
            if grant is CLOSED:
                if trial is not None:
                    self.breaker.trial_abandoned(trial)
                raise PoolClosed(self._name)
            held = grant

    async def _wait_turn(self, deadline: float) -> Grant:
        """Wait in line for a channel or a slot until ``deadline``.

        The waiter parks its task directly (no event): granting reschedules it with the
        grant, which it then owns.
        """
        if deadline <= trio.current_time():
            raise self._exhausted()
        books = self._books
        task = trio.lowlevel.current_task()

        def wake(grant: Grant) -> None:
            trio.lowlevel.reschedule(task, outcome.Value(grant))

        waiter = books.enqueue(wake)

        def abort(_: Any) -> trio.lowlevel.Abort:
            # Only called while nothing was granted: a grant reschedules the task first.
            books.leave_line(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        if deadline == math.inf:  # (no cancel scope to build: this is every wait in line)
            grant: Grant = await trio.lowlevel.wait_task_rescheduled(abort)
            return grant
        with trio.move_on_at(deadline):
            grant = await trio.lowlevel.wait_task_rescheduled(abort)
            return grant
        raise self._exhausted()

    def _exhausted(self) -> PoolExhausted:
        """Count a checkout that found no channel in time, and the error that says so."""
        self._stats.exhausted_total += 1
        return PoolExhausted(self._name, self.config.max_connections, self.config.acquire_timeout)

    def _waited(self, began: float, now: float, deadline: float | None) -> None:
        if deadline is None:
            self._stats.zero_waits += 1
        else:
            self._stats.acquire_waits.observe(now - began)
        if self._keeps_spares:
            self._upkeep.notice_change()

    async def _open(self, decision: Open, *, watch: bool = False) -> Channel:
        """Open a channel in the reserved slot; the slot is freed on any failure.

        The outcome is the breaker's to judge, before the caller sees it. With ``watch``
        (a spare), the channel is watched a moment before it fills its slot.
        """
        trial = decision.trial
        with decision.reservation as reservation:
            if trial is None and self.breaker.state is not BreakerState.CLOSED:
                # It opened since the slot was reserved (a spare planned before): no connect.
                raise CircuitOpen(self._name, self.retry_after(trio.current_time()))
            if trial is not None:  # (it may have waited in line): a connect from now
                now = trio.current_time()
                self.breaker.extend_trial(
                    trial, now + self._open_limit + self.config.connect_timeout
                )
            try:
                channel = await open_channel(
                    self.endpoint,
                    self.ssl_context,
                    self.config,
                    on_error=self._channel_failed,
                    on_trial_answered=self._trial_answered,
                    nursery=self._nursery,
                )
            except ConnectError as exc:
                if self._books.closed:
                    # Cut short by the pool's own exit (e.g. the nursery a WebSocket
                    # channel needs is gone): no fault of the relay's.
                    if trial is not None:
                        self.breaker.trial_abandoned(trial)
                    raise PoolClosed(self._name) from exc
                self._stats.connect_failed(exc.phase)
                self.breaker.failed(trio.current_time(), exc.reason, trial)
                raise
            except BaseException:
                if trial is not None:
                    self.breaker.trial_abandoned(trial)  # cancelled, or our own bug
                raise
            self.breaker.connected()
            channel.trial = trial  # decided by what the relay does with it
            self._opened(channel)
            if watch:
                if trial is not None:  # the watch, within connect_timeout, decides
                    now = trio.current_time()
                    self.breaker.extend_trial(trial, now + 2 * self.config.connect_timeout)
                await self._watch(channel)
            reservation.fill(channel)
        if self._books.closed:
            departure = self._planner.retire_held(channel, "shutdown", graceful=True)
            self._depart([departure] if departure else ())
            raise PoolClosed(self._name)
        return channel

    def _opened(self, channel: Channel) -> None:
        self._stats.channel_opened(channel)
        logger.debug("opened %r", channel)
        self._events.publish(
            {
                "type": "channel_opened",
                "endpoint": self._name,
                "channel": channel.id,
                "handshake_ms": _ms(channel.handshake_seconds),
            }
        )

    async def _watch(self, channel: Channel) -> None:
        """Watch a fresh spare (still in its reserved slot) before it is pooled: long
        enough to see a TLS terminator whose backend is gone hang up (it does so right
        after the handshake), scaled to the relay's pace.

        Raises:
            ConnectError: The relay hung up (phase ``"dropped"``: a failure its breaker
                has counted) or sent data unasked; the channel is closed.
        """
        window = min(
            self.config.connect_timeout, max(SPARE_WATCH_MIN, 2 * channel.handshake_seconds)
        )
        try:
            await channel.watch(window)
        except BaseException:
            self._leave_unpooled(channel, "aborted")
            raise
        if channel.spent is None:
            return
        self._leave_unpooled(channel, "error" if channel.errors else channel.spent)
        what = "hung up" if channel.errors else "sent data unasked"
        raise ConnectError(self._name, "dropped", f"the relay {what} right after the handshake")

    def _leave_unpooled(self, channel: Channel, reason: str) -> None:
        """A channel that never filled its slot leaves (a trial it carried proves nothing)."""
        trial, channel.trial = channel.trial, None
        if trial is not None:
            self.breaker.trial_abandoned(trial)
        self._depart([Departure(channel, reason, graceful=False)])

    def refuse(self, now: float) -> CircuitOpen:
        """Count a checkout the pool turns away here, and the error that says so."""
        return self.breaker.refuse(now)

    def retry_after(self, now: float) -> float:
        """Seconds until this relay's breaker lets a checkout through (0: it does)."""
        return self.breaker.retry_after(now) or 0.0

    def admits(self, now: float) -> bool:
        """Whether a checkout here would get past the breaker (without asking it)."""
        return self.breaker.admits(now)

    def has_room(self) -> bool:
        """Whether a checkout here would be served without waiting in line."""
        books = self._books
        if books.closed or books.waiters:
            return False
        return bool(books.idle) or not books.full

    # -- give-back ------------------------------------------------------------------------

    @enable_ki_protection
    def check_in(self, channel: Channel, exc: BaseException | None) -> None:
        """A lease ended: pool the channel, or close it (in the pool's nursery)."""
        departure = self._planner.check_in(channel, exc, self._now())
        if departure is not None:
            self._depart((departure,))
        elif self.learns_latency and exc is None:
            self._learn_latency(channel)

    @enable_ki_protection
    def _channel_failed(self, channel: Channel, kind: str) -> None:
        """A channel hit an I/O error, a request timeout, or was dropped by the relay:
        the breaker hears of it before the channel's user does."""
        if self.learns_latency:
            # Choosing among relays, an error weighs as a round trip of connect_timeout
            # (before the breaker hears of it: opening, it forgets the estimate).
            self._observe_latency(self.config.connect_timeout)
        trial, channel.trial = channel.trial, None
        self.breaker.failed(
            trio.current_time(),
            f"{kind} error on {channel!r}",
            trial,
            in_session=True,
            no_reply=kind == "timeout",
        )

    @enable_ki_protection
    def trial_lent(self, channel: Channel) -> None:
        """A trial's channel was lent under a time limit: its permit lasts as long, plus
        a connect's time (the limit's own timeout, not the permit's end, must decide)."""
        if channel.trial is not None and channel.deadline != math.inf:
            self.breaker.extend_trial(channel.trial, channel.deadline + self.config.connect_timeout)

    @enable_ki_protection
    def _trial_answered(self, channel: Channel) -> None:
        """A trial's channel got its first reply: the relay is back."""
        trial, channel.trial = channel.trial, None
        if trial is not None:
            self.breaker.succeeded(trio.current_time(), trial)

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

    # -- departures -----------------------------------------------------------------------

    @enable_ki_protection
    def _depart(self, departures: Iterable[Departure]) -> None:
        """Account for channels that left the books, in the same step (totals must never
        dip while a close is pending), then close them in the pool's nursery."""
        for channel, reason, graceful in departures:
            self._stats.channel_closed(channel, reason)
            self._events.publish(
                {
                    "type": "channel_closed",
                    "endpoint": self._name,
                    "channel": channel.id,
                    "reason": reason,
                }
            )
            logger.debug("closing %r (%s)", channel, reason)
            self._closer.close_soon(channel, graceful=graceful)

    def _released(self) -> None:
        """A channel or a slot left the books: whoever waits for that may go on."""
        if self._books.closed:
            self._drained.unpark_all()
        else:
            self._upkeep.notice_change()

    async def close_idle(self, reason: str) -> None:
        """Close every idle channel now (tests use it to make the next checkout connect)."""
        self._depart(self._planner.evict_idle(reason, spent_only=False))
        await trio.lowlevel.checkpoint()

    # -- upkeep ---------------------------------------------------------------------------

    def spares_missing(self, opening_spares: int) -> int:
        return self._planner.spares_missing(opening_spares)

    def plan_spares(self, opening_spares: int, concurrency: int) -> list[Open]:
        """Reserved slots for the spares ``min_idle`` lacks (see `Planner.plan_spares`)."""
        return self._planner.plan_spares(trio.current_time(), opening_spares, concurrency)

    @enable_ki_protection
    async def open_spare(self, decision: Open) -> None:
        """Open a spare in its reserved slot, watch it a moment, and pool it.

        Raises:
            ConnectError: Also when the relay hung up right after the handshake (phase
                ``"dropped"``; the breaker has counted it) or sent data unasked.
        """
        channel = await self._open(decision, watch=True)
        departure = self._planner.check_in(channel, None, trio.current_time(), served=False)
        if departure is not None:
            self._depart((departure,))

    def clean(self) -> None:
        """A cleanup pass (see `Planner.plan_cleanup`), and a rotation of the latency
        windows, forced here whatever the load so they never grow past two."""
        now = trio.current_time()
        self._stats.rotate(now, self.channels())
        self._depart(self._planner.plan_cleanup(now))

    def idle_websockets(self) -> list[WebSocketChannel]:
        return [ch for ch in self._books.idle if isinstance(ch, WebSocketChannel)]

    def evict_spent_idle(self) -> None:
        """Close idle channels a keepalive found unanswered (``stale``)."""
        self._depart(self._planner.evict_idle("stale", spent_only=True))

    async def run_background(self) -> None:
        """The relay's own tasks: spares, cleanup passes and the breaker's timer."""
        async with trio.open_nursery() as nursery:
            self._upkeep.start(nursery)
            nursery.start_soon(self.breaker.run)

    def _breaker_moved(self, event: BreakerEvent) -> None:
        """Told of each breaker transition as it happens, before anyone sees its cause."""
        self._breaker_events.publish(event)
        self._events.publish({"type": "breaker", **event.as_dict()})
        if event.to_state is BreakerState.OPEN:
            self.latency_estimate = None  # when it is back, it is found out afresh
        if event.to_state is BreakerState.CLOSED:
            self._upkeep.relay_is_back()
        else:
            self._upkeep.notice_change()

    # -- snapshot -------------------------------------------------------------------------

    def snapshot(self, *, channels: bool = True) -> RelaySnapshot:
        """The relay's state and figures at this instant (``channels``: each channel's too)."""
        return take_snapshot(
            self.endpoint,
            self._books,
            self._stats,
            self.breaker,
            self.config.min_idle,
            trio.current_time(),
            channels=channels,
        )

    # -- shutdown -------------------------------------------------------------------------

    def stop_lending(self) -> None:
        """New checkouts get `PoolClosed`; waiters are woken with it; idle channels close
        with a TLS goodbye (in the pool's nursery)."""
        if not self._books.closed:
            self._depart(self._planner.close())

    async def shutdown(self) -> None:
        """Stop lending, then wait (up to ``shutdown_timeout``) for lent channels to come
        back and for the closes under way; past that, close everything at once."""
        self.stop_lending()
        books = self._books
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + self.config.shutdown_timeout
        ):
            while books.in_use or books.opening:
                await self._drained.park()
            await self._closer.wait_closed()
        # Out of time: close what is still lent out under its users' feet.
        self._depart(self._planner.force_out())
        self._closer.cut_short()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
