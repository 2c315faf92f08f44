"""The planner: every decision about a relay's channels, made without awaiting.

What a checkout gets, whether a channel given back is kept, which spares to open and what
a cleanup pass closes are decided here, in small synchronous methods over the books
(`Slots`) and the breaker, as httpcore's pool assigns requests to connections in one
synchronous step. Each method changes the books and returns what to do: a `Decision`, and
the channels that left the books (`Departure`), for the relay to account for and close.
The relay (`_relay`) only acts on them; nothing here awaits, so no decision can be
interrupted half-way (and each is protected from Ctrl-C, as trio's locks are). Its only
system call is the ``poll()`` that checks an idle channel is quiet before it is lent.

A checkout is a short loop in the relay: ``plan()``; on `Wait`, wait in line and
``plan()`` again with what was granted (``held``); on `Open`, connect in the reserved
slot; on `Lend`, done; on `Refuse` or `Closed`, raise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple, TypeAlias, final

import trio
from trio.lowlevel import enable_ki_protection

from ._breaker import BreakerState, CircuitBreaker, Trial
from ._channel import Channel
from ._config import PoolConfig
from ._errors import CircuitOpen
from ._slots import Reservation, Slots

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

_CLOSED_BREAKER = BreakerState.CLOSED


class Lend(NamedTuple):
    """Hand ``channel`` (already counted in use) to the caller."""

    channel: Channel


class Open(NamedTuple):
    """Open a channel in ``reservation``'s slot; ``trial`` is the breaker's permit, if any."""

    reservation: Reservation
    trial: Trial | None


class Wait(NamedTuple):
    """Wait in line, then plan again with what is granted (keeping ``trial``)."""

    trial: Trial | None


class Refuse(NamedTuple):
    """The breaker turns the checkout away (counted): raise ``error``."""

    error: CircuitOpen


class Closed(NamedTuple):
    """The pool is closing: raise `PoolClosed`."""


# (Decisions are named tuples: one is made per checkout on the general path, and a
# tuple is the cheapest immutable object to make.)
Decision: TypeAlias = "Lend | Open | Wait | Refuse | Closed"
CLOSED_DECISION = Closed()
WAIT = Wait(None)


class Departure(NamedTuple):
    """A channel taken off the books: account for it (``reason``) and close it."""

    channel: Channel
    reason: str
    #: With a TLS close_notify (bounded), or at once (the peer may be gone, or the
    #: channel mid-record).
    graceful: bool


@final
class Planner:
    """Decides for one relay, from its books and its breaker."""

    def __init__(
        self,
        books: Slots,
        breaker: CircuitBreaker,
        config: PoolConfig,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.books = books
        self.breaker = breaker
        self._config = config
        self._max_lifetime = config.max_lifetime
        self._clock = clock  # only for max_lifetime on the fast path

    # -- checkout -------------------------------------------------------------------------

    @enable_ki_protection
    def lend_warm(self) -> Channel | None:
        """The fast path: the warmest idle channel if nothing stands in its way, else None
        (then `plan` decides, and may wait)."""
        books = self.books
        if not books.idle or books.waiters or books.closed:
            return None
        if self.breaker.state is not _CLOSED_BREAKER:
            return None
        channel = books.idle[-1]
        max_lifetime = self._max_lifetime
        # `unfit` and `Slots.take_idle`, inlined (this is every checkout): any reason at all
        # sends the checkout to `plan`, which says which and retires the channel.
        if (
            channel.spent is not None
            or not channel.settle()
            or (max_lifetime is not None and self._clock() - channel.opened_at >= max_lifetime)
        ):
            return None
        books.idle.pop()
        books.in_use.add(channel)
        return channel

    @enable_ki_protection
    def plan(
        self,
        now: float,
        held: Channel | Reservation | None = None,
        trial: Trial | None = None,
    ) -> tuple[Decision, list[Departure]]:
        """What a checkout does next.

        Args:
            now: The current time.
            held: What a wait in line was granted (the checkout owns it), or None.
            trial: The breaker's permit this checkout took before it waited, or None.
        """
        books, breaker = self.books, self.breaker
        departures: list[Departure] = []
        if trial is not None and not breaker.holds(trial):
            trial = None  # its half-open period is over: the breaker decides afresh
        if books.closed:
            if isinstance(held, Reservation):
                held.release()
            elif held is not None and held in books.in_use:  # (not forced out already)
                books.forget(held)
                departures.append(Departure(held, "shutdown", graceful=True))
            if trial is not None:
                breaker.trial_abandoned(trial)
            return CLOSED_DECISION, departures
        if trial is None and breaker.state is not _CLOSED_BREAKER:
            trial = breaker.take_trial(now)
            if trial is None:
                if isinstance(held, Reservation):
                    held.release()
                elif held is not None:
                    books.give_back(held)  # to the next in line, who is refused in turn
                return Refuse(breaker.refuse(now)), departures
        # A trial takes what anyone would: a healthy idle channel (whose first reply
        # decides), else a fresh one. Opening a fresh one while idle channels hold the
        # relay's (or its proxy's) connection limit would fail for that reason alone.
        if held is None:
            if books.waiters and trial is None:
                return WAIT, departures  # others are in line first
            held = books.take_idle() or books.reserve()
            if held is None:
                return (WAIT if trial is None else Wait(trial)), departures
        while not isinstance(held, Reservation):
            reason = self.unfit(held, now)
            if reason is None:
                held.trial = trial
                return Lend(held), departures
            departures.append(Departure(held, reason, graceful=False))
            held = books.swap_dead(held)
        return Open(held, trial), departures

    def unfit(self, channel: Channel, now: float) -> str | None:
        """Why an idle channel must not be lent (None: fit). One poll() when all is well.

        Anything the relay sent while the channel sat idle (end-of-file, a reset, a reply
        nobody read, data it pushed unasked) makes it unfit: the next user must start at
        a clean message boundary, and there is no telling where one is.
        """
        max_lifetime = self._max_lifetime
        if max_lifetime is not None and now - channel.opened_at >= max_lifetime:
            return "lifetime"
        if channel.spent is not None:
            return channel.spent  # e.g. closed by a user who kept a reference
        return None if channel.settle() else "stale"

    # -- give-back ------------------------------------------------------------------------

    @enable_ki_protection
    def check_in(
        self, channel: Channel, exc: BaseException | None, now: float, *, served: bool = True
    ) -> Departure | None:
        """A lease ended, normally (``exc`` None) or not, or a fresh spare settled
        (``served=False``): keep the channel (None), or take it off the books and say why."""
        books, breaker = self.books, self.breaker
        trial = channel.trial
        if trial is not None:  # not decided by a reply or a failure: the lease decides
            channel.trial = None
            if (
                (exc is None or not is_cancellation(exc))
                and served_well(channel)
                and not breaker.trial_needs_reply  # (there was no reply)
            ):
                breaker.succeeded(now, trial)
            else:
                breaker.trial_abandoned(trial)  # nothing proven either way
        elif not served:
            pass  # a spare: the handshake already told the breaker what it knows
        elif exc is None:
            if breaker.consecutive_failures and served_well(channel):
                breaker.succeeded(now)  # (a success changes nothing when none failed)
        elif not is_cancellation(exc) and served_well(channel):
            breaker.succeeded(now)  # the application's own error: the relay did its part
        if channel not in books.in_use:
            return None  # already forced out by a shutdown that ran out of time
        if exc is not None:
            books.forget(channel)
            return Departure(channel, "error" if channel.errors else "aborted", graceful=False)
        max_lifetime = self._max_lifetime
        if books.closed:
            reason = "shutdown"
        elif channel.spent is not None:
            reason = channel.spent
        elif channel.unanswered:
            reason = "unanswered"
        elif channel.buffered_bytes:
            reason = "unread data"  # not at a message boundary: the rest is someone's reply
        elif max_lifetime is not None and now - channel.opened_at >= max_lifetime:
            reason = "lifetime"
        else:
            channel.idle_since = now
            books.give_back(channel)
            return None
        books.forget(channel)
        return Departure(channel, reason, graceful=True)

    @enable_ki_protection
    def retire_held(self, channel: Channel, reason: str, *, graceful: bool) -> Departure | None:
        """A held channel leaves the books (a fresh one the pool closed under, a spare
        that failed to settle); None if a shutdown out of time forced it out already.
        A trial it carried proves nothing: its permit goes back."""
        trial, channel.trial = channel.trial, None
        if trial is not None:
            self.breaker.trial_abandoned(trial)
        if channel not in self.books.in_use:
            return None
        self.books.forget(channel)
        return Departure(channel, reason, graceful)

    # -- spares and cleanup ---------------------------------------------------------------

    def spares_missing(self, opening_spares: int) -> int:
        return self._config.min_idle - len(self.books.idle) - opening_spares

    @enable_ki_protection
    def plan_spares(self, now: float, opening_spares: int, concurrency: int) -> list[Open]:
        """Slots for the spares ``min_idle`` lacks, at most ``concurrency`` opening at once.

        While the breaker is half-open, one spare may be its trial (finding out whether the
        relay is back without waiting for traffic), unless idle channels are there to
        serve the next checkout as its trial, or only a reply can prove the relay back
        (a quiet spare does not prove a relay that did not answer); while it is open, none.
        """
        books, breaker = self.books, self.breaker
        opens: list[Open] = []
        if books.closed or books.waiters:
            return opens
        if breaker.state is _CLOSED_BREAKER:
            while (
                self.spares_missing(opening_spares + len(opens)) > 0
                and opening_spares + len(opens) < concurrency
            ):
                reservation = books.reserve()
                if reservation is None:
                    break
                opens.append(Open(reservation, None))
        elif (
            self.spares_missing(opening_spares) > 0
            and not opening_spares
            and not books.idle
            and not breaker.trial_needs_reply
        ):
            trial = breaker.take_trial(now)
            if trial is not None:
                reservation = books.reserve()
                if reservation is None:
                    breaker.trial_abandoned(trial)
                else:
                    opens.append(Open(reservation, trial))
        return opens

    @enable_ki_protection
    def plan_cleanup(self, now: float) -> list[Departure]:
        """A cleanup pass's verdicts on the idle channels, taken off the books.

        Channels past ``max_lifetime``, channels whose relay sent something while they sat
        idle, slow ones, and those idle longer than ``idle_timeout`` (longest idle first,
        never below ``min_idle``). Lent channels that have become slow are marked to be
        retired when they come back.
        """
        books, config = self.books, self._config
        max_latency_ms = config.max_latency_ms
        if max_latency_ms is not None:
            for channel in books.in_use:
                if too_slow(channel, max_latency_ms):
                    channel.retire_when_returned("slow")
        departures: list[Departure] = []
        keepers: list[Channel] = []
        for channel in books.idle:  # longest idle first
            reason = self.unfit(channel, now)
            if reason is None and max_latency_ms is not None and too_slow(channel, max_latency_ms):
                reason = "slow"
            if reason is None:
                keepers.append(channel)
            else:
                # The relay is gone from a stale channel: no goodbye to wait for.
                departures.append(Departure(channel, reason, graceful=reason != "stale"))
        surplus = len(keepers) - config.min_idle
        for channel in keepers:
            if surplus <= 0:
                break
            if now - channel.idle_since >= config.idle_timeout:
                departures.append(Departure(channel, "idle", graceful=True))
                surplus -= 1
        for departure in departures:
            books.evict_idle(departure.channel)
        return departures

    @enable_ki_protection
    def evict_idle(self, reason: str, *, spent_only: bool) -> list[Departure]:
        """Idle channels off the books at once: all of them, or (``spent_only``) those
        found spent while idle (a keepalive ping that went unanswered)."""
        leaving = [ch for ch in self.books.idle if not (spent_only and ch.reusable)]
        for channel in leaving:
            self.books.evict_idle(channel)
        return [Departure(channel, reason, graceful=False) for channel in leaving]

    # -- shutdown -------------------------------------------------------------------------

    @enable_ki_protection
    def close(self) -> list[Departure]:
        """Stop lending: waiters get `Closed`, idle channels leave with a TLS goodbye."""
        return [Departure(ch, "shutdown", graceful=True) for ch in self.books.close()]

    @enable_ki_protection
    def force_out(self) -> list[Departure]:
        """The shutdown ran out of time: channels still lent leave under their users."""
        lent = list(self.books.in_use)
        for channel in lent:
            self.books.forget(channel)
        return [Departure(channel, "shutdown", graceful=False) for channel in lent]


def served_well(channel: Channel) -> bool:
    """Whether a lease's channel shows the relay did its part: no I/O error, its last
    request answered, nothing cut short (a cancelled send or receive, a failed ping)."""
    return not channel.errors and not channel.unanswered and channel.spent in (None, "slow")


def is_cancellation(exc: BaseException) -> bool:
    """A `trio.Cancelled`, or a group of nothing but (a block whose nursery was
    cancelled): an abort, which blames no one and vouches for no one."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return False


def too_slow(channel: Channel, max_latency_ms: float) -> bool:
    """Whether the median of the channel's last few round trips is above the limit."""
    recent = channel.recent_round_trip()
    return recent is not None and recent * 1000 > max_latency_ms
