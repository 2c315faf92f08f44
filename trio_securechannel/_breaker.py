"""The circuit breaker: stop hammering a relay that is down, notice quickly when it is back.

The state machine is small and synchronous, so a failure that reaches the threshold has
opened the breaker before its caller sees the error, and each transition is handed on at
once: subscribers receive it over their own trio memory channels (see `_events`), none is
lost (unless a subscriber falls 64 events behind, which its ``dropped`` counts), not even
one made as the pool closes. The breaker's task in the pool's nursery owns the cooldown
timer.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import trio
from trio.lowlevel import enable_ki_protection

from ._errors import CircuitOpen

# Transitions: opening at WARNING, half-opening and closing at INFO (docs/logging.rst).
logger = logging.getLogger("trio_securechannel.breaker")


class BreakerState(enum.Enum):
    """Where a relay's breaker stands. Its ``value`` is what `status()
    <SecureChannelPool.status>`, ``/events`` and `BreakerEvent.as_dict` show.

    Attributes:
        CLOSED: ``"closed"``. Traffic flows; consecutive failures are being counted, and
            ``breaker_failure_threshold`` of them open the breaker.
        OPEN: ``"open"``. Every checkout fails at once with `CircuitOpen`, touching no
            socket, until ``breaker_cooldown`` has passed.
        HALF_OPEN: ``"half_open"``. The cooldown is over: ``breaker_half_open_trials``
            trial checkouts go through, and everyone else still gets `CircuitOpen` until a
            trial decides: its first reply closes the breaker, its failure reopens it.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@final
@dataclass(frozen=True)
class BreakerEvent:
    """One transition of a relay's breaker.

    Attributes:
        endpoint: The relay, as ``host:port``.
        from_state: The state it left.
        to_state: The state it entered.
        time: `trio.current_time` of the transition.
        timestamp: Wall-clock time of the transition (`time.time`), for logs.
        reason: Why, in words (the last error when it opened).
    """

    endpoint: str
    from_state: BreakerState
    to_state: BreakerState
    time: float
    timestamp: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """The event as JSON-serialisable data."""
        return {
            "endpoint": self.endpoint,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "time": self.time,
            "timestamp": self.timestamp,
            "reason": self.reason,
        }


@final
class Trial:
    """A permit to make one trial checkout while the breaker is half-open.

    Attributes:
        expires_at: When another checkout may try too, if nothing has decided (see
            `CircuitBreaker.trial_timeout`); this trial's outcome still counts after.
        abandoned: It was given back (cancelled, never reached the relay): its outcome,
            if any, counts for nothing.
    """

    __slots__ = ("abandoned", "expires_at", "generation")

    def __init__(self, generation: int, expires_at: float) -> None:
        self.generation = generation
        self.expires_at = expires_at
        self.abandoned = False


@final
class CircuitBreaker:
    """Consecutive-failure breaker with a cooldown and half-open trials."""

    def __init__(
        self,
        endpoint: str,
        *,
        failure_threshold: int,
        cooldown: float,
        half_open_trials: int,
        trial_timeout: float,
        on_transition: Callable[[BreakerEvent], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.half_open_trials = half_open_trials
        # How long a trial holds its place, unless extended (`extend_trial`, for a connect
        # or a lease with a time limit): past it, another checkout may try as well, so a
        # trial lent to a hung relay cannot keep everyone out for ever. Its outcome, when
        # it comes, still decides (a slow relay that answers is back).
        self.trial_timeout = trial_timeout
        self._on_transition = on_transition
        self.state = CLOSED
        self.consecutive_failures = 0
        # How many of those hit channels in use (the others: connects). A completed
        # handshake clears connect failures only: a relay that accepts every session and
        # then drops it must still trip.
        self.session_failures = 0
        self._timeouts = 0  # of those, relays that did not answer in time
        self.opened_total = 0
        self.rejected_total = 0
        self.transitions: Counter[BreakerState] = Counter()  # by the state entered
        self.open_until = -math.inf
        # The breaker opened on a relay that did not answer in time (request_timeout): only
        # a reply proves such a relay back, never a handshake or a quiet spare.
        self.trial_needs_reply = False
        self._trials: set[Trial] = set()  # permits out in the current half-open period
        self._generation = 0  # a new one each half-open period, so stale permits count for nothing
        self._moved = trio.lowlevel.ParkingLot()  # wakes the timer task on every transition

    # -- decisions ------------------------------------------------------------------------

    @enable_ki_protection
    def admit(self, now: float) -> Trial | None:
        """Let a checkout through (None), as a half-open trial (a `Trial`), or refuse it.

        Raises:
            CircuitOpen: The breaker is open, or half-open with every trial taken.
        """
        if self.state is CLOSED:
            return None
        trial = self.take_trial(now)
        if trial is not None:
            return trial
        raise self.refuse(now)

    def admits(self, now: float) -> bool:
        """Whether a checkout would get through now (a pure read: takes no trial)."""
        if self.state is CLOSED:
            return True
        if self.state is OPEN:
            return now >= self.open_until
        return self.trial_available()

    @enable_ki_protection
    def refuse(self, now: float) -> CircuitOpen:
        """Count a checkout turned away, and the error that tells its caller when to retry."""
        self.rejected_total += 1
        return CircuitOpen(self.endpoint, self.retry_after(now) or 0.0)

    def trial_available(self) -> bool:
        return self.state is HALF_OPEN and len(self._trials) < self.half_open_trials

    @enable_ki_protection
    def take_trial(self, now: float) -> Trial | None:
        """A trial permit if the cooldown is over and one is left, else None."""
        self.cooldown_elapsed(now)
        if self.state is not HALF_OPEN or len(self._trials) >= self.half_open_trials:
            return None
        trial = Trial(self._generation, now + self.trial_timeout)
        self._trials.add(trial)
        self._moved.unpark_all()  # the timer now has a trial to watch
        return trial

    def retry_after(self, now: float) -> float | None:
        """Seconds until a checkout may get through; None while the breaker is closed."""
        if self.state is CLOSED:
            return None
        if self.state is OPEN:
            return max(0.0, self.open_until - now)
        if len(self._trials) < self.half_open_trials:
            return 0.0
        # The earliest trial out decides, or gives its permit back, by then.
        return max(0.0, min(trial.expires_at for trial in self._trials) - now)

    # -- outcomes -------------------------------------------------------------------------

    @enable_ki_protection
    def succeeded(self, now: float, trial: Trial | None = None) -> None:
        """A checkout ended without an I/O error, or a trial's channel proved the relay
        (its first reply; a spare that the relay left alone; a lease that ended well)."""
        if trial is not None:
            if self.holds(trial):
                self._move(CLOSED, now, "trial succeeded")
        elif self.state is CLOSED:
            self._forget_failures()
        # Open or half-open: only a trial's outcome decides, not a straggler's.

    @enable_ki_protection
    def connected(self) -> None:
        """A handshake completed: failures to connect are vouched for, not those of
        channels in use. (Not a trial's outcome: a relay that completes every handshake
        and then hangs up, or never answers, is not back; a trial's channel decides.)"""
        if self.state is CLOSED:
            self.consecutive_failures = self.session_failures

    @enable_ki_protection
    def failed(
        self,
        now: float,
        reason: str,
        trial: Trial | None = None,
        *,
        in_session: bool = False,
        no_reply: bool = False,
    ) -> None:
        """A connect or handshake failed, or (``in_session``) a session the relay had
        accepted failed: an I/O error or a hang-up on a channel, or (``no_reply``, a
        session failure too) no reply within the checkout's time limit."""
        if trial is not None:
            if self.holds(trial):
                # (Once only a reply proves the relay, that stays so until one does.)
                needs_reply = no_reply or self.trial_needs_reply
                self._open(now, f"trial failed: {reason}", needs_reply=needs_reply)
        elif self.state is CLOSED:
            self.consecutive_failures += 1
            self.session_failures += in_session or no_reply
            self._timeouts += no_reply
            if self.consecutive_failures >= self.failure_threshold:
                self._open(
                    now,
                    f"{self.consecutive_failures} consecutive failures; last: {reason}",
                    needs_reply=self._timeouts > 0,
                )

    @enable_ki_protection
    def trial_abandoned(self, trial: Trial) -> None:
        """A trial was cancelled, or never reached the relay: its permit goes back."""
        if self.holds(trial):
            trial.abandoned = True
            self._trials.discard(trial)

    @enable_ki_protection
    def cooldown_elapsed(self, now: float) -> None:
        if self.state is OPEN and now >= self.open_until:
            self._move(HALF_OPEN, now, f"cooldown of {self.cooldown:g}s over")

    def status(self, now: float) -> dict[str, Any]:
        retry_after = self.retry_after(now)  # a pure read: /status and /metrics agree
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "retry_after": retry_after,
            "opened_total": self.opened_total,
            "rejected_total": self.rejected_total,
        }

    def holds(self, trial: Trial) -> bool:
        """Whether ``trial`` is a permit of this half-open period, not given back."""
        return (
            self.state is HALF_OPEN and trial.generation == self._generation and not trial.abandoned
        )

    @enable_ki_protection
    def extend_trial(self, trial: Trial, until: float) -> None:
        """The trial is connecting, or a lease with a time limit: it holds its place
        until ``until``."""
        if self.holds(trial) and until > trial.expires_at:
            trial.expires_at = until
            self._moved.unpark_all()  # the timer's deadline moved

    def _forget_failures(self) -> None:
        self.consecutive_failures = self.session_failures = self._timeouts = 0

    def _open(self, now: float, reason: str, *, needs_reply: bool = False) -> None:
        self.trial_needs_reply = needs_reply
        self.open_until = now + self.cooldown
        self.opened_total += 1
        self._move(OPEN, now, reason)

    def _move(self, to_state: BreakerState, now: float, reason: str) -> None:
        event = BreakerEvent(self.endpoint, self.state, to_state, now, time.time(), reason)
        self.state = to_state
        self.transitions[to_state] += 1
        self._trials.clear()
        if to_state is HALF_OPEN:
            self._generation += 1
        elif to_state is CLOSED:
            self._forget_failures()
            self.trial_needs_reply = False
        level = logging.WARNING if to_state is OPEN else logging.INFO
        logger.log(level, "circuit breaker for %s: %s -> %s (%s)", self.endpoint,
                   event.from_state.value, to_state.value, reason)  # fmt: skip
        self._moved.unpark_all()
        if self._on_transition is not None:
            self._on_transition(event)

    # -- the breaker's task ---------------------------------------------------------------

    async def run(self) -> None:
        """The breaker's task: end each cooldown on time, even with no checkout to notice,
        and take back the permit of a trial that has not decided in time."""
        while True:
            with trio.move_on_at(self._next_deadline()):
                await self._moved.park()
                continue
            now = trio.current_time()
            self.cooldown_elapsed(now)
            self._expire_trials(now)

    def _next_deadline(self) -> float:
        if self.state is OPEN:
            return self.open_until
        if self.state is HALF_OPEN and self._trials:
            return min(trial.expires_at for trial in self._trials)
        return math.inf

    @enable_ki_protection
    def _expire_trials(self, now: float) -> None:
        if self.state is HALF_OPEN:
            for trial in [trial for trial in self._trials if now >= trial.expires_at]:
                self._trials.discard(trial)  # its place, not its say
                logger.info(
                    "circuit breaker for %s: a trial is undecided; another may try",
                    self.endpoint,
                )
