"""The planner on its own: random interleavings of everything that can happen to a relay's
books, with no sockets and no event loop, and the invariants checked after every step.

Hypothesis's stateful testing drives it: checkouts (fast path and planned), waits in line,
grants, give-ups, opens that succeed, fail or are cancelled, give-backs of every kind,
channels that break or go stale, slow channels, the breaker's timer, cleanup passes, spares
and shutdown. The real-socket tests (test_pool, test_breaker, test_cancellation, ...) check
the same promises through the relay's I/O on top of this.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import hypothesis.strategies as st
import trio
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from trio_securechannel import PoolConfig
from trio_securechannel._breaker import BreakerState, CircuitBreaker, Trial
from trio_securechannel._channel import Channel
from trio_securechannel._planner import (
    Closed,
    Departure,
    Lend,
    Open,
    Planner,
    Refuse,
    Wait,
    is_cancellation,
)
from trio_securechannel._slots import CLOSED, Grant, Reservation, Slots, Waiter

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

MAX = 3
_ids = itertools.count(1)
#: What the interleavings reached, over a whole run: each of MUST_REACH (all reached
#: dozens of times in a typical run) must be reached, or the run proves nothing about it.
#: The rarer paths are walked on purpose in the scenarios at the end of this file.
reached: Counter[str] = Counter()
MUST_REACH = {
    "lend", "lend after a wait", "open", "open as a trial", "wait", "wait with a trial",
    "refuse", "refuse releasing a slot", "closed", "departed: stale",
    "departed: unanswered", "departed: unread data", "departed: error", "departed: shutdown",
}  # fmt: skip


class FakeChannel:
    """What the planner reads of a channel, and nothing else."""

    def __init__(self, now: float) -> None:
        self.id = next(_ids)
        self.opened_at = now
        self.idle_since = now
        self.spent: str | None = None
        self.errors: Counter[str] = Counter()
        self.unanswered = False
        self.buffered_bytes = 0  # read off the connection, not taken by its user
        self.pending = False  # the relay sent something while it sat idle
        self.latency: float | None = None
        self.trial: Trial | None = None

    def __repr__(self) -> str:
        return f"<FakeChannel #{self.id} {self.spent or 'ok'}>"

    @property
    def reusable(self) -> bool:
        return self.spent is None

    def settle(self) -> bool:
        return not self.pending

    def recent_round_trip(self) -> float | None:
        return self.latency

    def retire_when_returned(self, reason: str) -> None:
        if self.spent is None:
            self.spent = reason


class _First:
    """Stands in for hypothesis's data where a rule drives another: the first, always."""

    def draw(self, strategy: Any) -> int:
        return 0


@dataclass(eq=False)
class Checkout:
    """One checkout between its plans: what it holds, its trial, and its place in line."""

    trial: Trial | None = None
    waiter: Waiter | None = None
    granted: Grant | None = None


class PlannerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.config = PoolConfig(
            max_connections=MAX,
            min_idle=1,
            max_lifetime=50.0,
            idle_timeout=20.0,
            max_latency_ms=100.0,
            breaker_failure_threshold=2,
            breaker_cooldown=10.0,
            connect_timeout=5.0,
        )
        self.books = Slots(MAX)
        self.breaker = CircuitBreaker(
            "relay.test:443",
            failure_threshold=2,
            cooldown=10.0,
            half_open_trials=1,
            trial_timeout=5.0,
        )
        self.planner = Planner(self.books, self.breaker, self.config, clock=lambda: self.now)
        self.waiting: list[Checkout] = []
        self.woken: list[Checkout] = []
        self.opening: list[tuple[Reservation, Trial | None, bool]] = []  # (.., is_spare)
        self.holding: list[Channel] = []
        # Spares watched a moment after their handshake, still in their reserved slots.
        self.watching: list[tuple[Reservation, Channel]] = []
        self.created: list[Channel] = []
        self.departed: set[Channel] = set()

    # -- acting on decisions, as the relay does -------------------------------------------

    def depart(self, departures: list[Departure] | tuple[Departure, ...]) -> None:
        for departure in departures:
            assert departure.channel not in self.departed, "closed twice"
            self.departed.add(departure.channel)
            reached[f"departed: {departure.reason}"] += 1

    def assert_fit_to_lend(self, channel: Channel) -> None:
        fake = cast(FakeChannel, channel)
        assert not self.books.closed, "lent after the pool closed"
        if self.breaker.state is not BreakerState.CLOSED:
            assert fake.trial is not None, "lent past a breaker not closed, not as a trial"
            assert self.breaker.holds(fake.trial)
        assert fake.spent is None, "lent a spent channel"
        assert not fake.pending, "lent a channel with something unread on it"
        assert self.now - fake.opened_at < 50.0, "lent past max_lifetime"

    def act(
        self, checkout: Checkout, plan: tuple[Any, list[Departure]], held: Grant | None = None
    ) -> None:
        decision, departures = plan
        self.depart(departures)
        if isinstance(decision, Lend):
            self.assert_fit_to_lend(decision.channel)
            reached["lend after a wait" if held is not None else "lend"] += 1
            if decision.channel.trial is not None:
                reached["lend as a trial"] += 1
            self.holding.append(decision.channel)
        elif isinstance(decision, Open):
            assert not self.books.closed, "a connect after the pool closed"
            if self.breaker.state is not BreakerState.CLOSED:
                assert decision.trial is not None, "a connect without the breaker's leave"
            reached["open as a trial" if decision.trial else "open"] += 1
            self.opening.append((decision.reservation, decision.trial, False))
        elif isinstance(decision, Wait):
            reached["wait with a trial" if decision.trial else "wait"] += 1
            checkout.trial = decision.trial
            checkout.waiter = self.books.enqueue(lambda grant: self.grant(checkout, grant))
            self.waiting.append(checkout)
        elif isinstance(decision, Refuse):
            assert self.breaker.state is not BreakerState.CLOSED
            reached["refuse"] += 1
            if isinstance(held, FakeChannel):
                reached["refuse handing a channel on"] += 1
            elif isinstance(held, Reservation):
                reached["refuse releasing a slot"] += 1
        else:
            assert isinstance(decision, Closed)
            assert self.books.closed
            reached["closed"] += 1

    def grant(self, checkout: Checkout, grant: Grant) -> None:
        self.waiting.remove(checkout)
        checkout.granted = grant
        self.woken.append(checkout)

    def new_channel(self) -> Channel:
        channel = cast(Channel, FakeChannel(self.now))
        self.created.append(channel)
        return channel

    # -- rules ----------------------------------------------------------------------------

    @rule()
    def fast_checkout(self) -> None:
        channel = self.planner.lend_warm()
        if channel is not None:
            self.assert_fit_to_lend(channel)
            self.holding.append(channel)

    @rule()
    def checkout(self) -> None:
        self.act(Checkout(), self.planner.plan(self.now))

    @rule()
    def crowd(self) -> None:
        """More checkouts at once than there are slots: some wait in line."""
        for _ in range(MAX + 1):
            self.act(Checkout(), self.planner.plan(self.now))

    @rule(data=st.data())
    def breaker_trips(self, data: st.DataObject) -> None:
        """Failures elsewhere (other channels' I/O errors) open the breaker, now and then."""
        if data.draw(st.integers(0, 3)):
            return
        # Now and then timeouts, after which only a reply proves the relay back.
        no_reply = data.draw(st.integers(0, 3)) == 3
        for _ in range(self.breaker.failure_threshold):
            self.breaker.failed(self.now, "elsewhere", in_session=True, no_reply=no_reply)

    @precondition(lambda self: self.woken)
    @rule(data=st.data())
    def resume_after_grant(self, data: st.DataObject) -> None:
        checkout = self.woken.pop(data.draw(st.integers(0, len(self.woken) - 1)))
        grant = checkout.granted
        if grant is CLOSED:
            if checkout.trial is not None:
                self.breaker.trial_abandoned(checkout.trial)
            return
        assert grant is not None
        self.act(checkout, self.planner.plan(self.now, grant, checkout.trial), held=grant)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def give_up_waiting(self, data: st.DataObject) -> None:
        checkout = data.draw(st.sampled_from(self.waiting))
        assert checkout.waiter is not None
        self.books.leave_line(checkout.waiter)
        self.waiting.remove(checkout)
        if checkout.trial is not None:
            self.breaker.trial_abandoned(checkout.trial)

    @precondition(lambda self: self.opening)
    @rule(data=st.data(), outcome=st.sampled_from(["connected", "failed", "cancelled"]))
    def finish_open(self, data: st.DataObject, outcome: str) -> None:
        reservation, trial, spare = self.opening.pop(
            data.draw(st.integers(0, len(self.opening) - 1))
        )
        connects = trial is not None or self.breaker.state is BreakerState.CLOSED
        if spare and connects and outcome == "connected":
            channel = self.new_channel()
            self.breaker.connected()
            channel.trial = trial
            self.watching.append((reservation, channel))  # watched in its reserved slot
            return
        with reservation:  # as the relay does: released on every exit but a fill
            if not connects:
                return  # it opened since the slot was reserved: no connect
            if outcome == "failed":
                self.breaker.failed(self.now, "refused", trial)
                return
            if outcome == "cancelled":
                if trial is not None:
                    self.breaker.trial_abandoned(trial)
                return
            channel = self.new_channel()
            self.breaker.connected()
            channel.trial = trial  # decided by what the relay does with it
            reservation.fill(channel)
        if self.books.closed:
            departure = self.planner.retire_held(channel, "shutdown", graceful=True)
            self.depart([departure] if departure else [])
        else:
            self.holding.append(channel)

    @precondition(lambda self: self.watching)
    @rule(data=st.data(), how=st.sampled_from(["settles", "dropped", "cancelled"]))
    def spare_settles(self, data: st.DataObject, how: str) -> None:
        """A watched spare is pooled, is dropped by the relay, or its watch is cancelled
        (as `Relay._open` with ``watch``, then `Relay.open_spare`)."""
        reservation, channel = self.watching.pop(data.draw(st.integers(0, len(self.watching) - 1)))
        with reservation:
            if how != "settles":
                if how == "dropped":
                    self.channel_failed(channel, "dropped")
                if channel.trial is not None:
                    self.breaker.trial_abandoned(channel.trial)
                    channel.trial = None
                reason = "error" if how == "dropped" else "aborted"
                self.depart([Departure(channel, reason, graceful=False)])
                return
            reservation.fill(channel)
        if self.books.closed:
            departure = self.planner.retire_held(channel, "shutdown", graceful=True)
        else:
            departure = self.planner.check_in(channel, None, self.now, served=False)
        self.depart([departure] if departure else [])

    def channel_failed(self, channel: Channel, kind: str) -> None:
        """What a channel and its relay do on an I/O error (`Relay._channel_failed`)."""
        fake = cast(FakeChannel, channel)
        if fake.spent != "error":
            fake.errors[kind] += 1
            fake.spent = "error"
            trial, fake.trial = fake.trial, None
            no_reply = kind == "timeout"
            self.breaker.failed(self.now, kind, trial, in_session=True, no_reply=no_reply)

    @precondition(lambda self: any(ch.trial is not None for ch in self.holding))
    @rule()
    def trial_answered(self) -> None:
        """A trial's channel gets its first reply (`Relay._trial_answered`)."""
        channel = next(ch for ch in self.holding if ch.trial is not None)
        trial, channel.trial = channel.trial, None
        assert trial is not None
        reached["trial answered"] += 1
        self.breaker.succeeded(self.now, trial)

    @precondition(lambda self: self.opening)
    @rule()
    def every_open_connects(self) -> None:
        """A burst of handshakes completes."""
        while self.opening:
            self.finish_open(_First(), "connected")

    @precondition(lambda self: self.holding)
    @rule()
    def every_lease_ends_well(self) -> None:
        while self.holding:
            self.give_back(_First(), "ok")

    @precondition(lambda self: self.holding)
    @rule(
        data=st.data(),
        how=st.sampled_from(
            ["ok", "ok", "unanswered", "half a line", "app error", "io error", "kept ref"]
        ),
    )
    def give_back(self, data: st.DataObject, how: str) -> None:
        channel = self.holding.pop(data.draw(st.integers(0, len(self.holding) - 1)))
        fake = cast(FakeChannel, channel)
        exc: BaseException | None = None
        if how == "unanswered":
            fake.unanswered = True
        elif how == "half a line":
            fake.buffered_bytes = 7
        elif how == "app error":
            exc = RuntimeError("the application's own")
        elif how == "io error" and fake.spent != "error":
            self.channel_failed(channel, "io")
            exc = trio.BrokenResourceError()
        elif how == "kept ref":
            fake.spent = "closed"  # the user closed it and kept it
        departure = self.planner.check_in(channel, exc, self.now)
        self.depart([departure] if departure else [])

    @precondition(lambda self: self.books.idle)
    @rule(data=st.data(), what=st.sampled_from(["stale", "slow"]))
    def idle_channel_changes(self, data: st.DataObject, what: str) -> None:
        fake = cast(FakeChannel, data.draw(st.sampled_from(list(self.books.idle))))
        if what == "stale":
            fake.pending = True
        else:
            fake.latency = 0.5

    @rule(seconds=st.sampled_from([0.5, 3.0, 10.0, 25.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        # The breaker's timer task: cooldowns end, undecided trials fail.
        self.breaker.cooldown_elapsed(self.now)
        self.breaker._expire_trials(self.now)

    @rule()
    def cleanup_pass(self) -> None:
        fit = sum(
            1
            for ch in self.books.idle
            if ch.spent is None
            and not cast(FakeChannel, ch).pending
            and self.now - ch.opened_at < 50.0
            and (cast(FakeChannel, ch).latency or 0.0) <= 0.1
        )
        self.depart(self.planner.plan_cleanup(self.now))
        assert len(self.books.idle) >= min(fit, 1), "reaped below min_idle"

    @rule()
    def keepalive_found_spent(self) -> None:
        self.depart(self.planner.evict_idle("stale", spent_only=True))

    @rule()
    def keep_spares(self) -> None:
        spares_opening = sum(1 for *_, spare in self.opening if spare)
        opens = self.planner.plan_spares(self.now, spares_opening, 2)
        for spare in opens:
            assert not self.books.closed
            if self.breaker.state is not BreakerState.CLOSED:
                assert spare.trial is not None, "a spare without the breaker's leave"
                reached["spare as a trial"] += 1
        self.opening.extend((o.reservation, o.trial, True) for o in opens)

    @precondition(lambda self: not self.books.closed)
    @rule(data=st.data())
    def shutdown(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 29)):
            return  # rarely: most interleavings should run on an open pool
        self.depart(self.planner.close())
        assert not self.waiting  # every waiter was told

    @precondition(lambda self: self.books.closed)
    @rule()
    def shutdown_runs_out_of_time(self) -> None:
        self.depart(self.planner.force_out())

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def never_over_the_bound(self) -> None:
        assert self.books.total <= MAX

    @invariant()
    def every_channel_is_in_exactly_one_place(self) -> None:
        idle, in_use = list(self.books.idle), self.books.in_use
        assert len(set(idle)) == len(idle)
        assert not set(idle) & in_use
        watched = {channel for _, channel in self.watching}
        for channel in self.created:
            places = (channel in idle) + (channel in in_use) + (channel in self.departed)
            assert places + (channel in watched) == 1, channel

    @invariant()
    def the_books_match_the_holders(self) -> None:
        granted = [c.granted for c in self.woken]
        held = {ch for ch in self.holding if ch not in self.departed}
        granted_channels = {g for g in granted if isinstance(g, FakeChannel)} - self.departed
        assert self.books.in_use == held | granted_channels
        unsettled = [r for r, *_ in self.opening] + [r for r, _ in self.watching]
        unsettled += [g for g in granted if isinstance(g, Reservation)]
        assert all(not r.settled for r in unsettled)
        assert self.books.opening == len(unsettled)
        assert len(self.books.waiters) == len(self.waiting)

    @invariant()
    def nobody_waits_while_a_channel_or_a_slot_is_free(self) -> None:
        if self.books.waiters:
            assert not self.books.idle
            assert self.books.full

    @invariant()
    def idle_channels_are_reusable_unless_a_pass_is_due(self) -> None:
        for channel in self.books.idle:
            fake = cast(FakeChannel, channel)
            assert not fake.unanswered
            assert not fake.buffered_bytes
            assert not fake.errors

    @invariant()
    def a_closed_pool_keeps_nothing_idle_and_nobody_waiting(self) -> None:
        if self.books.closed:
            assert not self.books.idle
            assert not self.books.waiters

    @invariant()
    def every_trial_permit_out_is_held_by_someone(self) -> None:
        held = {c.trial for c in [*self.waiting, *self.woken] if c.trial is not None}
        held |= {trial for _, trial, _ in self.opening if trial is not None}
        watched = [ch for _, ch in self.watching]
        held |= {ch.trial for ch in [*self.holding, *watched] if ch.trial is not None}
        holding = {t for t in held if self.breaker.holds(t)}
        assert self.breaker._trials <= holding
        # Out of their place only once it ran out (their outcome still counts).
        assert all(t.expires_at <= self.now for t in holding - self.breaker._trials)


def test_random_interleavings_keep_every_invariant() -> None:
    reached.clear()
    run_state_machine_as_test(
        PlannerMachine, settings=settings(max_examples=800, stateful_step_count=80, deadline=None)
    )
    missing = MUST_REACH - set(reached)
    assert not missing, f"never reached: {sorted(missing)}"


def test_cancellation_groups_are_cancellations() -> None:
    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.sleep_forever)
                    await trio.sleep_forever()
            except BaseException as exc:
                caught.append(exc)
                raise

    caught: list[BaseException] = []
    trio.run(main)
    (exc,) = caught
    assert is_cancellation(exc)
    assert not is_cancellation(RuntimeError())
    assert not is_cancellation(BaseExceptionGroup("mixed", [RuntimeError(), KeyboardInterrupt()]))


async def test_the_books_change_in_steps_ctrl_c_cannot_split() -> None:
    # Like trio's own locks: a KeyboardInterrupt is held back while the books change, so
    # it can never leave a slot counted twice or lost. What the books call back into
    # (a waiter's wake-up, a channel's liveness check) sees the protection.
    protected: list[bool] = []
    assert not trio.lowlevel.currently_ki_protected()  # (so the checks below can fail)
    books = Slots(1)
    breaker = CircuitBreaker(
        "relay.test:443", failure_threshold=2, cooldown=10.0, half_open_trials=1,
        trial_timeout=5.0,
    )  # fmt: skip
    planner = Planner(books, breaker, PoolConfig(max_connections=1))
    decision, _ = planner.plan(0.0)
    assert isinstance(decision, Open)
    channel = FakeChannel(0.0)
    decision.reservation.fill(cast(Channel, channel))
    books.enqueue(lambda grant: protected.append(trio.lowlevel.currently_ki_protected()))
    assert planner.check_in(cast(Channel, channel), None, 1.0) is None  # to the waiter

    def settle() -> bool:
        protected.append(trio.lowlevel.currently_ki_protected())
        return True

    channel.settle = settle  # type: ignore[method-assign]
    books.give_back(cast(Channel, channel))
    assert planner.lend_warm() is cast(Channel, channel)
    assert protected == [True, True]


# -- the rarer paths, walked on purpose with the same machine and its invariants ----------


class _Scenario:
    """Drives a `PlannerMachine` step by step, checking every invariant after each."""

    def __init__(self) -> None:
        self.machine = PlannerMachine()
        self._before = reached.copy()

    def newly(self, label: str) -> int:
        """How often this scenario reached ``label``."""
        return reached[label] - self._before[label]

    def __getattr__(self, rule: str) -> Any:
        step = getattr(self.machine, rule)

        def run(*args: Any) -> None:
            step(*args)
            for name in dir(PlannerMachine):
                check = getattr(PlannerMachine, name)
                if getattr(check, "hypothesis_stateful_invariant", None) is not None:
                    check(self.machine)

        return run


def _lent(scenario: _Scenario, count: int) -> None:
    for _ in range(count):
        scenario.checkout()
        scenario.finish_open(_First(), "connected")


def test_a_trial_in_line_handed_a_healthy_channel_runs_on_it() -> None:
    scenario = _Scenario()
    machine = scenario.machine
    _lent(scenario, MAX)  # every slot lent
    scenario.breaker_trips(_Always())  # failures elsewhere: open
    scenario.time_passes(10.0)  # cooldown over: half-open
    scenario.checkout()  # takes the trial, finds every slot lent: waits with it
    trial = machine.waiting[0].trial
    assert trial is not None
    scenario.give_back(_First(), "ok")  # a lent channel comes back: handed to the trial
    scenario.resume_after_grant(_First())
    assert scenario.newly("lend as a trial") == 1  # no connect: its first reply decides
    assert not machine.opening
    assert machine.holding[-1].trial is trial
    scenario.trial_answered()
    assert machine.breaker.state is BreakerState.CLOSED


def test_a_trial_handed_a_channel_as_the_pool_closes_gives_everything_back() -> None:
    scenario = _Scenario()
    machine = scenario.machine
    _lent(scenario, MAX)
    scenario.breaker_trips(_Always())
    scenario.time_passes(10.0)  # half-open
    scenario.checkout()  # waits in line with the trial
    scenario.give_back(_First(), "ok")  # handed a channel...
    scenario.shutdown(_Always())  # ... but the pool closes before it runs
    scenario.resume_after_grant(_First())  # Closed: the channel leaves, the permit returns
    assert scenario.newly("closed") == 1
    assert machine.breaker.trial_available()


def test_a_refused_waiter_hands_its_channel_to_the_next_in_line() -> None:
    scenario = _Scenario()
    machine = scenario.machine
    _lent(scenario, MAX)
    scenario.crowd()  # MAX + 1 more: all wait
    scenario.give_back(_First(), "ok")  # to the first in line
    scenario.breaker_trips(_Always())  # open before it runs
    scenario.resume_after_grant(_First())  # refused: the channel goes to the next in line
    assert scenario.newly("refuse handing a channel on") == 1
    assert len(machine.woken) == 1  # the next waiter now holds it
    assert isinstance(machine.woken[0].granted, FakeChannel)


def test_cleanup_retires_idle_slow_and_old_channels_but_keeps_min_idle() -> None:
    scenario = _Scenario()
    machine = scenario.machine
    _lent(scenario, MAX)
    scenario.every_lease_ends_well()  # three idle channels
    slow = cast(FakeChannel, machine.books.idle[-1])
    slow.latency = 0.5  # its recent round trips are over max_latency_ms
    scenario.time_passes(25.0)  # past idle_timeout
    scenario.cleanup_pass()
    assert [ch.id for ch in machine.books.idle] == [cast(FakeChannel, machine.created[1]).id]
    assert scenario.newly("departed: slow") == 1
    assert scenario.newly("departed: idle") == 1
    scenario.time_passes(25.0)
    scenario.time_passes(3.0)  # past max_lifetime
    scenario.cleanup_pass()
    assert scenario.newly("departed: lifetime") == 1
    assert not machine.books.idle


def test_a_trial_runs_on_a_healthy_idle_channel_and_an_undecided_one_lets_go() -> None:
    # Idle channels may hold all a proxy lets through: a fresh connect for the trial would
    # fail for that alone. The trial takes one of them; its lease (or first reply) decides.
    scenario = _Scenario()
    machine = scenario.machine
    _lent(scenario, MAX)
    scenario.every_lease_ends_well()  # every slot holds an idle channel
    scenario.breaker_trips(_Always())
    scenario.time_passes(10.0)  # half-open
    scenario.checkout()
    assert scenario.newly("lend as a trial") == 1
    assert not machine.opening
    assert breaker_state(machine) is BreakerState.HALF_OPEN
    scenario.time_passes(10.0)  # undecided past its place: another checkout may try
    assert breaker_state(machine) is BreakerState.HALF_OPEN
    assert machine.breaker.trial_available()
    scenario.give_back(_First(), "ok")  # the lease ends late, and well: that still decides
    assert breaker_state(machine) is BreakerState.CLOSED


def breaker_state(machine: PlannerMachine) -> BreakerState:
    return machine.breaker.state


def test_the_spare_keeper_makes_the_half_open_trial_itself() -> None:
    scenario = _Scenario()
    machine = scenario.machine
    scenario.breaker_trips(_Always())
    scenario.keep_spares()  # open: no connect at all
    assert not scenario.machine.opening
    scenario.time_passes(10.0)  # half-open, and min_idle lacks its spare
    scenario.keep_spares()
    assert scenario.newly("spare as a trial") == 1
    scenario.keep_spares()  # one trial at a time
    assert len(machine.opening) == 1
    scenario.finish_open(_First(), "connected")  # the handshake alone decides nothing ...
    assert breaker_state(machine) is BreakerState.HALF_OPEN
    scenario.spare_settles(_First(), "dropped")  # ... the relay hung up on it: reopened
    assert breaker_state(machine) is BreakerState.OPEN
    scenario.time_passes(10.0)
    scenario.keep_spares()
    scenario.finish_open(_First(), "connected")
    scenario.spare_settles(_First(), "settles")  # left alone: the relay is back
    assert breaker_state(machine) is BreakerState.CLOSED


class _Always:
    """Stands in for hypothesis's data: the draw that makes a rule act."""

    def draw(self, strategy: Any) -> int:
        return 0


def test_a_spare_watched_as_the_pool_closes_leaves_once() -> None:
    scenario = _Scenario()
    scenario.keep_spares()  # min_idle lacks its spare
    scenario.finish_open(_First(), "connected")  # it is watched, in its reserved slot ...
    scenario.shutdown(_Always())
    scenario.shutdown_runs_out_of_time()  # ... which the shutdown cannot force out
    assert scenario.machine.books.opening == 1
    scenario.spare_settles(_First(), "settles")  # its watch ends: it fills, then leaves
    assert scenario.newly("departed: shutdown") == 1
    assert scenario.machine.books.opening == 0
