"""The circuit breaker: FAULTS.md rows 14-15.

First the state machine alone, with explicit times; then through the pool on the mock clock
(exact virtual times); then against real relays on 127.0.0.1 that refuse, hang up and recover.
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import trio_securechannel as sc
from trio_securechannel import BreakerState
from trio_securechannel._breaker import CircuitBreaker
from trio_securechannel._relay import SPARE_WATCH_MIN
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import new_relay
from helpers import books, closed_port, echo, relay_of, wait_until

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make_breaker(threshold: int = 5, cooldown: float = 60.0, trials: int = 1) -> CircuitBreaker:
    return CircuitBreaker(
        "relay.test:443",
        failure_threshold=threshold,
        cooldown=cooldown,
        half_open_trials=trials,
        trial_timeout=10.0,
    )


def fail_times(breaker: CircuitBreaker, count: int, now: float) -> None:
    for _ in range(count):
        breaker.failed(now, "refused")


# -- the state machine ------------------------------------------------------------------------


async def test_threshold_opens_and_rejects_until_cooldown_ends() -> None:
    breaker = make_breaker(threshold=5, cooldown=60.0)
    fail_times(breaker, 4, now=100.0)
    assert breaker.state is CLOSED
    assert breaker.admit(100.0) is None
    breaker.failed(100.0, "refused")
    assert breaker.state is OPEN
    with pytest.raises(sc.CircuitOpen) as info:
        breaker.admit(130.0)
    assert info.value.retry_after == 30.0
    with pytest.raises(sc.CircuitOpen):
        breaker.admit(159.999)
    assert breaker.rejected_total == 2
    trial = breaker.admit(160.0)  # the cooldown is over: the first comer is the trial
    assert trial is not None
    assert breaker.state is HALF_OPEN
    with pytest.raises(sc.CircuitOpen) as info:
        breaker.admit(161.0)  # one trial only; others wait for its outcome
    assert info.value.retry_after == 9.0  # the trial's connect_timeout bounds the wait


async def test_a_handshake_clears_connect_failures_but_not_session_failures() -> None:
    breaker = make_breaker(threshold=3)
    fail_times(breaker, 2, now=0.0)  # connects refused
    breaker.connected()  # then one succeeds: the relay is reachable again
    assert breaker.consecutive_failures == 0
    breaker.failed(2.0, "io error", in_session=True)  # a session it accepted, then dropped
    breaker.connected()
    assert breaker.consecutive_failures == 1  # handshakes do not vouch for sessions
    breaker.failed(4.0, "refused")
    breaker.connected()  # ... but they do for connects
    assert breaker.consecutive_failures == 1
    breaker.failed(6.0, "io error", in_session=True)
    breaker.connected()
    breaker.failed(8.0, "io error", in_session=True)
    assert breaker.state is OPEN
    breaker = make_breaker(threshold=3)
    breaker.failed(0.0, "io error", in_session=True)
    breaker.succeeded(1.0)  # a lease served without error does
    assert (breaker.consecutive_failures, breaker.session_failures) == (0, 0)


async def test_success_resets_the_consecutive_count() -> None:
    breaker = make_breaker(threshold=3)
    fail_times(breaker, 2, now=0.0)
    breaker.succeeded(0.0)
    fail_times(breaker, 2, now=0.0)
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 2


@pytest.mark.parametrize("outcome", ["success", "failure", "abandoned"])
async def test_trial_outcomes(outcome: str) -> None:
    breaker = make_breaker(threshold=1, cooldown=10.0)
    breaker.failed(0.0, "down")
    trial = breaker.admit(10.0)
    assert trial is not None
    if outcome == "success":
        breaker.succeeded(12.0, trial)
        assert breaker.state is CLOSED
        assert breaker.admit(12.0) is None
    elif outcome == "failure":
        breaker.failed(12.0, "still down", trial)
        assert breaker.state is OPEN
        assert breaker.open_until == 22.0  # a fresh cooldown from the trial's failure
        assert breaker.opened_total == 2
    else:
        breaker.trial_abandoned(trial)  # cancelled: the permit goes back
        assert breaker.state is HALF_OPEN
        assert breaker.admit(12.0) is not None


async def test_stragglers_do_not_decide() -> None:
    breaker = make_breaker(threshold=1, cooldown=10.0, trials=2)
    breaker.failed(0.0, "down")
    breaker.succeeded(1.0)  # a channel lent before the breaker opened finishes fine
    assert breaker.state is OPEN
    first, second = breaker.admit(10.0), breaker.admit(10.0)
    assert first is not None
    assert second is not None
    breaker.failed(11.0, "an old channel breaks")  # not a trial: ignored
    assert breaker.state is HALF_OPEN
    breaker.failed(11.0, "trial 1 failed", first)
    assert breaker.state is OPEN
    breaker.succeeded(11.5, second)  # the other trial's permit belongs to a past half-open
    breaker.trial_abandoned(second)
    assert breaker.state is OPEN
    third = breaker.admit(21.0)
    assert third is not None
    breaker.succeeded(21.5, third)
    assert breaker.state is CLOSED


# -- through the pool, on the mock clock ------------------------------------------------------


def memory_pool(relay: LoopbackRelay, context: ssl.SSLContext, **options: Any) -> Any:
    return sc.open_pool(
        "relay.test:443", ssl_context=context, open_transport=relay.open_memory_stream, **options
    )


async def test_breaker_opens_before_the_failure_is_raised_and_blocks_io(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    async with memory_pool(memory_relay, client_context, breaker_cooldown=30.0) as pool:
        for attempt in range(1, 6):
            with pytest.raises(sc.ConnectError):
                async with pool.connection():
                    pass
            # The 5th failure has opened the breaker by the time its caller sees it.
            assert pool.breaker_state is (OPEN if attempt == 5 else CLOSED)
        opened_at = trio.current_time()
        await trio.sleep(10.0)
        for _ in range(20):
            with pytest.raises(sc.CircuitOpen) as info:
                async with pool.connection():
                    pass
            assert info.value.retry_after == opened_at + 30.0 - trio.current_time()
        assert len(memory_relay.connect_times) == 5  # no connection attempt while open
        status = pool.status()["breaker"]
        assert status == {
            "state": "open",
            "consecutive_failures": 5,
            "retry_after": 20.0,
            "opened_total": 1,
            "rejected_total": 20,
        }


async def test_transitions_reach_subscribers_at_exact_times(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    options = {"breaker_failure_threshold": 2, "breaker_cooldown": 30.0}
    start = trio.current_time()
    seen: list[tuple[str, str, float]] = []
    async with memory_pool(memory_relay, client_context, **options) as pool:

        async def watch() -> None:
            with pool.breaker_events() as events:
                async for event in events:
                    seen.append((event.from_state.value, event.to_state.value, event.time - start))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(2):
                with pytest.raises(sc.ConnectError):
                    async with pool.connection():
                        pass
            await trio.sleep_until(start + 30.01)  # the breaker task ends the cooldown on time
            assert pool.breaker_state is HALF_OPEN
            memory_relay.fault = Fault.NONE
            async with pool.connection() as channel:  # the trial, on a fresh channel
                assert await echo(channel, b"back") == b"back"
            assert pool.breaker_state is CLOSED
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert seen == [
        ("closed", "open", 0.0),
        ("open", "half_open", 30.0),
        ("half_open", "closed", 30.01),
    ]


async def test_cancelled_trial_gives_its_permit_back(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    options = {"breaker_failure_threshold": 1, "breaker_cooldown": 5.0, "connect_timeout": 100.0}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        with pytest.raises(sc.ConnectError):
            async with pool.connection():
                pass
        await trio.sleep(5.0)
        memory_relay.fault = Fault.NO_TLS
        with trio.move_on_after(1.0) as scope:
            async with pool.connection():
                pytest.fail("the silent relay never completes a handshake")
        assert scope.cancelled_caught
        assert pool.breaker_state is HALF_OPEN  # neither success nor failure
        memory_relay.fault = Fault.NONE
        async with pool.connection() as channel:  # the permit came back: a new trial
            assert await echo(channel, b"ok") == b"ok"
        assert pool.breaker_state is CLOSED
        assert len(memory_relay.connect_times) == 3
        assert books(pool)["opening"] == 0


async def test_what_is_not_a_failure(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {"breaker_failure_threshold": 1, "max_connections": 1}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        with pytest.raises(KeyError):
            async with pool.connection():
                raise KeyError("the application's own error")
        async with pool.connection():
            with pytest.raises(sc.PoolExhausted):
                async with pool.connection():
                    pass
        with trio.move_on_after(1.0):
            async with pool.connection() as channel:
                await channel.receive_some()  # cancelled while waiting for a reply
        assert pool.breaker_state is CLOSED
        assert pool.status()["breaker"]["consecutive_failures"] == 0


async def test_io_errors_on_lent_channels_open_the_breaker(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # Three channels lent at once all break when the relay drops them: three failures in a
    # row.
    states_seen_by_callers: list[BreakerState] = []
    async with memory_pool(memory_relay, client_context, breaker_failure_threshold=3) as pool:
        all_lent = trio.Event()

        async def use() -> None:
            async with pool.connection() as channel:
                assert await echo(channel, b"x") == b"x"
                if books(pool)["in_use"] == 3:
                    all_lent.set()
                await all_lent.wait()
                try:
                    await channel.receive_some()
                except trio.BrokenResourceError:
                    states_seen_by_callers.append(pool.breaker_state)
                    raise

        with pytest.RaisesGroup(
            trio.BrokenResourceError, trio.BrokenResourceError, trio.BrokenResourceError
        ):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(use)
                await all_lent.wait()
                await trio.testing.wait_all_tasks_blocked()
                memory_relay.kill_connections()
        assert states_seen_by_callers == [CLOSED, CLOSED, OPEN]
        assert pool.status()["errors_by_kind"] == {"io": 3}
        with pytest.raises(sc.CircuitOpen):
            async with pool.connection():
                pass


async def test_a_relay_that_completes_handshakes_but_serves_nobody_opens_the_breaker(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # Each handshake succeeds, each session dies at once: a handshake alone does not
    # reset the count (only a lease served without error does), so the breaker opens.
    memory_relay.fault = Fault.DROP_AFTER_HANDSHAKE
    async with memory_pool(memory_relay, client_context, breaker_failure_threshold=3) as pool:
        for failures in (1, 2, 3):
            with pytest.raises(trio.BrokenResourceError):
                await use_once(pool)
            assert pool.status()["breaker"]["consecutive_failures"] == failures
        assert pool.breaker_state is OPEN
        with pytest.raises(sc.CircuitOpen):
            await use_once(pool)
        assert memory_relay.handshakes == 3
        memory_relay.fault = Fault.NONE
        await trio.sleep(pool.config.breaker_cooldown)
        await use_once(pool)  # the trial's handshake closes the breaker, the lease works
        assert pool.breaker_state is CLOSED
        assert pool.status()["breaker"]["consecutive_failures"] == 0


async def test_a_lease_ending_unanswered_is_no_success(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    async with memory_pool(memory_relay, client_context, breaker_failure_threshold=3) as pool:
        memory_relay.fault = Fault.DROP_AFTER_HANDSHAKE
        with pytest.raises(trio.BrokenResourceError):
            await use_once(pool)
        memory_relay.fault = Fault.NONE
        async with pool.connection() as channel:
            await channel.send_all(b"no reply read")
        assert pool.status()["breaker"]["consecutive_failures"] == 1
        await use_once(pool)
        assert pool.status()["breaker"]["consecutive_failures"] == 0


async def test_spares_connecting_between_refusals_keep_the_breaker_closed(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # Every third connect is refused; the others complete. With spares kept (and
    # recycled by max_lifetime) but no lease ever served, the count must not build up.
    attempts = itertools.count(1)
    open_transport = memory_relay.open_memory_stream

    async def sometimes_refused(host: str, port: int) -> trio.abc.Stream:
        if next(attempts) % 3 == 0:
            raise ConnectionRefusedError(111, "Connection refused")
        return await open_transport(host, port)

    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=sometimes_refused,
        breaker_failure_threshold=2,
        min_idle=1,
        max_lifetime=1.0,
        cleanup_interval=0.5,
    ) as pool:
        await trio.sleep(30)
        assert next(attempts) > 20  # many spares came and went
        assert pool.breaker_state is CLOSED


async def use_once(pool: sc.SecureChannelPool) -> None:
    async with pool.connection() as channel:
        assert await echo(channel, b"x") == b"x"


async def test_a_checkout_waiting_in_line_when_the_breaker_opens_does_not_connect(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {"max_connections": 1, "acquire_timeout": 10.0, "breaker_failure_threshold": 1}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        outcome: list[BaseException] = []

        async def wait_in_line() -> None:
            try:
                async with pool.connection():
                    pytest.fail("the breaker opened while this checkout waited")
            except sc.CircuitOpen as exc:
                outcome.append(exc)

        async def hold_while_the_relay_dies(nursery: trio.Nursery) -> None:
            async with pool.connection() as channel:
                nursery.start_soon(wait_in_line)
                await trio.testing.wait_all_tasks_blocked()
                assert books(pool)["waiting"] == 1
                memory_relay.kill_connections()
                await channel.receive_some()  # the relay is gone: the breaker opens

        async with trio.open_nursery() as nursery:
            with pytest.raises(trio.BrokenResourceError):
                await hold_while_the_relay_dies(nursery)
        assert len(outcome) == 1
        assert len(memory_relay.connect_times) == 1  # the freed slot was not used to connect
        assert books(pool)["opening"] == 0


async def test_spares_stop_while_open_then_probe_and_refill(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    options = {"min_idle": 2, "breaker_failure_threshold": 3, "breaker_cooldown": 60.0}
    start = trio.current_time()
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await trio.sleep_until(start + 1.01)
        # Two spares fail at once at 0; after a 1 s backoff a single probe fails at 1,
        # the third failure in a row, which opens the breaker.
        assert [t - start for t in memory_relay.connect_times] == [0.0, 0.0, 1.0]
        assert pool.breaker_state is OPEN
        await trio.sleep_until(start + 60.99)
        assert len(memory_relay.connect_times) == 3  # silence for the whole cooldown
        memory_relay.fault = Fault.NONE
        await trio.sleep_until(start + 61.5)
        # At 61 the spare keeper made one trial itself, which closed the breaker once the
        # relay had left it alone for a moment, and the second spare followed.
        assert [t - start for t in memory_relay.connect_times][3:] == [
            61.0,
            61.0 + SPARE_WATCH_MIN,
        ]
        assert pool.breaker_state is CLOSED
        assert books(pool)["idle"] == 2
        assert pool.healthy


async def test_slow_subscriber_never_blocks_and_counts_drops(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    options = {"breaker_failure_threshold": 1, "breaker_cooldown": 1.0}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        sleeper = pool.breaker_events()  # subscribed, never read
        reader_saw: list[sc.BreakerEvent] = []

        async def read_all() -> None:
            async for event in pool.breaker_events():
                reader_saw.append(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(50):  # each round: closed/half-open -> open -> half-open
                with pytest.raises(sc.ConnectError):
                    async with pool.connection():
                        pass
                await trio.sleep(1.0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert len(reader_saw) == 100
        assert all(a.to_state is b.from_state for a, b in itertools.pairwise(reader_saw))
        assert sleeper.dropped == 100 - 64
        kept = [event async for event in _drain(sleeper)]
        assert kept == reader_saw[-64:]  # the oldest were dropped, the newest kept


async def _drain(stream: sc.EventStream[sc.BreakerEvent]) -> Any:
    stream.end()
    async for event in stream:
        yield event


# -- real relays on 127.0.0.1 -----------------------------------------------------------------


async def test_open_breaker_makes_no_connection_and_lets_one_trial_through(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.CLOSE_ON_ACCEPT
    options: dict[str, Any] = {"breaker_cooldown": 0.3, "max_connections": 10}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        for _ in range(5):
            with pytest.raises(sc.ConnectError):
                async with pool.connection():
                    pass
        assert relay.accepted == 5
        for _ in range(10):
            with pytest.raises(sc.CircuitOpen):
                async with pool.connection():
                    pass
        assert relay.accepted == 5  # the open breaker touched no socket
        relay.fault = Fault.NONE
        await trio.sleep(0.3)
        outcomes: list[str] = []

        async def checkout() -> None:
            try:
                async with pool.connection() as channel:
                    assert await echo(channel, b"trial") == b"trial"
                    outcomes.append("through")
            except sc.CircuitOpen:
                outcomes.append("circuit open")

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(checkout)
        assert sorted(outcomes) == ["circuit open"] * 4 + ["through"]
        assert relay.accepted == 6  # exactly one of the five reached the relay
        assert pool.breaker_state is CLOSED
        async with pool.connection() as channel:
            assert await echo(channel, b"normal again") == b"normal again"


async def test_refused_relay_that_comes_back(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    port = closed_port()
    options: dict[str, Any] = {"breaker_failure_threshold": 3, "breaker_cooldown": 0.2}
    async with sc.open_pool(("127.0.0.1", port), ssl_context=client_context, **options) as pool:
        for _ in range(3):
            with pytest.raises(sc.ConnectError, match="refused"):
                async with pool.connection():
                    pass
        assert pool.breaker_state is OPEN
        relay = new_relay()
        relay.port = port
        await nursery.start(relay.serve)  # the relay is back, on the same port
        await wait_until(lambda: pool.breaker_state is HALF_OPEN)
        async with pool.connection() as channel:
            assert await echo(channel, b"welcome back") == b"welcome back"
        assert pool.breaker_state is CLOSED
        assert pool.status()["breaker"]["opened_total"] == 1
        relay.stop()


# -- what the breaker review found ------------------------------------------------------------


async def test_subscribers_see_the_opening_even_when_the_pool_closes_at_once(
    memory_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    memory_relay.fault = Fault.REFUSE
    seen: list[tuple[str, str]] = []
    async with trio.open_nursery() as nursery:

        async def watch(events: sc.EventStream[sc.BreakerEvent]) -> None:
            async for event in events:  # ends by itself when the pool closes
                seen.append((event.from_state.value, event.to_state.value))

        async with memory_pool(memory_relay, client_context, breaker_failure_threshold=1) as pool:
            nursery.start_soon(watch, pool.breaker_events())
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(sc.ConnectError):
                async with pool.connection():
                    pass
            # Leave at once: the breaker's task has not run since the failure.
    assert seen == [("closed", "open")]


async def test_closed_and_abandoned_subscriptions_are_dropped(
    memory_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    memory_relay.fault = Fault.REFUSE
    async with memory_pool(memory_relay, client_context, breaker_failure_threshold=1) as pool:
        with pool.breaker_events() as closed_early:
            pass
        abandoned = pool.breaker_events()
        del abandoned  # never read, never closed: garbage, not a subscriber
        kept = pool.breaker_events()
        assert len(pool._breaker_events._streams) == 1
        with pytest.raises(sc.ConnectError):
            async with pool.connection():
                pass
        await trio.testing.wait_all_tasks_blocked()
        event = await kept.__anext__()
        assert event.to_state is OPEN
        assert [event async for event in closed_early] == []  # closed: nothing more comes


async def test_several_trials_and_retry_after(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    memory_relay.fault = Fault.REFUSE
    options = {
        "breaker_failure_threshold": 1,
        "breaker_cooldown": 10.0,
        "breaker_half_open_trials": 2,
        "connect_timeout": 8.0,
    }
    async with memory_pool(memory_relay, client_context, **options) as pool:
        with pytest.raises(sc.ConnectError):
            async with pool.connection():
                pass
        await trio.sleep(10.0)
        memory_relay.fault = Fault.NO_TLS  # trials hang until their connect_timeout
        outcomes: list[str] = []

        async def trial() -> None:
            try:
                async with pool.connection():
                    pass
            except sc.ConnectError:
                outcomes.append("trial failed")

        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            nursery.start_soon(trial)
            await trio.sleep(1.0)
            nursery.start_soon(trial)
            await trio.sleep(1.0)
            with pytest.raises(sc.CircuitOpen) as info:  # both permits are out
                async with pool.connection():
                    pass
            # The first trial decides, or gives its permit back, by the end of its permit:
            # its connect (8 s) with as long again to spare.
            assert info.value.retry_after == began + 16.0 - trio.current_time()
        assert outcomes == ["trial failed"] * 2
        assert pool.breaker_state is OPEN  # the first failed trial reopened it


async def test_a_trial_waits_its_turn_when_every_slot_is_lent(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {
        "max_connections": 1,
        "acquire_timeout": 30.0,
        "breaker_failure_threshold": 1,
        "breaker_cooldown": 5.0,
    }
    async with memory_pool(memory_relay, client_context, **options) as pool:
        release = trio.Event()

        async def hold() -> None:
            async with pool.connection() as channel:
                assert await echo(channel, b"held") == b"held"
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            relay_of(pool).breaker.failed(trio.current_time(), "a failure elsewhere")  # opens it
            await trio.sleep(5.0)

            async def release_later() -> None:
                await trio.sleep(2.0)
                release.set()

            nursery.start_soon(release_later)
            async with pool.connection() as channel:  # the trial: waits 2 s for the slot
                assert await echo(channel, b"trial") == b"trial"
        assert pool.breaker_state is CLOSED
        # The held channel, given back healthy, carried the trial: its reply closed the
        # breaker, and no connect was needed.
        assert books(pool)["closed_by_reason"] == {}
        assert books(pool)["opened_total"] == 1


async def test_a_spare_planned_before_the_opening_does_not_connect(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # The spare keeper's retry and a user's failing connect end at the same instant; the
    # failure opens the breaker and the spare, planned a moment earlier, must not connect.
    # Tasks due at one instant run in no promised order, so the race is run many times.
    memory_relay.fault = Fault.REFUSE
    memory_relay.connect_delay = 0.25
    connects: list[tuple[float, BreakerState]] = []
    pools: list[sc.SecureChannelPool] = []

    async def spy(host: str, port: int) -> trio.abc.Stream:
        connects.append((trio.current_time(), pools[-1].breaker_state))
        return await memory_relay.open_memory_stream(host, port)

    options: dict[str, Any] = {"min_idle": 1, "breaker_failure_threshold": 2}
    for _ in range(20):
        async with sc.open_pool(
            "relay.test:443", ssl_context=client_context, open_transport=spy, **options
        ) as pool:
            pools.append(pool)
            await trio.sleep(0.5)
            with pytest.raises(sc.ConnectError):
                async with pool.connection():
                    pass
            await trio.sleep(1.0)
            assert pool.breaker_state is OPEN
    assert len(connects) >= 40
    assert all(state is CLOSED for _, state in connects), connects


async def test_a_waiter_handed_a_channel_after_the_opening_gets_circuit_open(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # The breaker opens (a failure elsewhere) while W waits in line behind A, who holds the
    # only channel; when A gives it back, W must not get traffic through it.
    options = {
        "max_connections": 1,
        "acquire_timeout": math.inf,
        "breaker_failure_threshold": 1,
        "breaker_cooldown": 30.0,
    }
    async with memory_pool(memory_relay, client_context, **options) as pool:
        outcome: list[str] = []

        async def wait_in_line() -> None:
            try:
                async with pool.connection() as channel:
                    await channel.send_all(b"through an open breaker")
                    outcome.append("sent")
            except sc.CircuitOpen:
                outcome.append("circuit open")

        async with trio.open_nursery() as nursery, pool.connection() as held:
            assert await echo(held, b"held") == b"held"
            nursery.start_soon(wait_in_line)
            await trio.testing.wait_all_tasks_blocked()
            assert books(pool)["waiting"] == 1
            relay_of(pool).breaker.failed(trio.current_time(), "another channel broke")
        assert outcome == ["circuit open"]
        assert memory_relay.bytes_sent == 4  # only A's "held" ever reached the relay
        assert books(pool)["idle"] == 1  # the channel went back, nothing leaked
        await trio.sleep(30.0)
        async with pool.connection() as trial:  # after the cooldown: the trial
            assert trial is held  # healthy and idle: its first reply decides
            assert pool.breaker_state is BreakerState.HALF_OPEN
            assert await echo(trial, b"ok") == b"ok"
            assert pool.breaker_state is CLOSED
        assert pool.breaker_state is CLOSED


#: One slot, a long wait in line: a trial that must wait for the slot a lease holds.
ONE_SLOT_TO_WAIT_FOR = {
    "max_connections": 1,
    "acquire_timeout": 60.0,
    "connect_timeout": 5.0,
    "breaker_failure_threshold": 1,
    "breaker_cooldown": 10.0,
}


async def hold_the_only_slot(
    pool: sc.SecureChannelPool,
    seconds: float,
    then: Callable[[], None] = lambda: None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A lease on the pool's only channel for ``seconds``, then ``then()`` inside it."""
    async with pool.connection() as channel:
        assert await echo(channel, b"a") == b"a"
        task_status.started()
        await trio.sleep(seconds)
        then()


async def test_a_trial_waiting_in_line_is_no_failure_of_the_relay(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    async with memory_pool(memory_relay, client_context, **ONE_SLOT_TO_WAIT_FOR) as pool:
        async with trio.open_nursery() as nursery:
            await nursery.start(hold_the_only_slot, pool, 40.0)  # a subscription, say
            relay_of(pool).breaker.failed(trio.current_time(), "a failure elsewhere")
            await trio.sleep(10.0)  # half-open
            async with pool.connection() as channel:  # the trial waits 30 s for the slot
                assert await echo(channel, b"trial") == b"trial"
        status = pool.status()
    # Its permit ran out while it waited (another checkout could have tried); the relay
    # was never tried meanwhile, so nothing reopened the breaker; its reply closed it.
    assert status["breaker"]["opened_total"] == 1
    assert status["breaker"]["state"] == "closed"


async def test_a_trial_answered_within_its_own_time_limit_closes_the_breaker(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    options = {"connect_timeout": 5.0, "breaker_failure_threshold": 1, "breaker_cooldown": 10.0}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        relay_of(pool).breaker.failed(trio.current_time(), "a failure elsewhere")
        await trio.sleep(10.0)
        memory_relay.latency = 15.0  # slow, but well within the checkout's 60 s
        async with pool.connection(timeout=60.0) as channel:
            assert await echo(channel, b"slow") == b"slow"
        assert pool.breaker_state is CLOSED


async def test_a_slow_relay_that_answers_closes_the_breaker(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # No request_timeout; replies take 12 s, longer than a trial holds its place (twice
    # connect_timeout): the late reply still proves the relay back.
    options = {"connect_timeout": 5.0, "breaker_failure_threshold": 1, "breaker_cooldown": 10.0}
    async with memory_pool(memory_relay, client_context, **options) as pool:
        relay_of(pool).breaker.failed(trio.current_time(), "a transient failure")
        await trio.sleep(10.0)
        memory_relay.latency = 12.0
        async with pool.connection() as channel:
            assert await echo(channel, b"slow") == b"slow"
        assert pool.breaker_state is CLOSED


async def test_a_trials_connect_that_fails_after_a_wait_in_line_reopens_the_breaker(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    def the_network_hangs() -> None:
        memory_relay.connect_delay = 1000.0
        raise AppError  # the lease's channel is discarded, its slot freed

    async def lease_that_fails(task_status: trio.TaskStatus[None]) -> None:
        with pytest.raises(AppError):
            await hold_the_only_slot(pool, 19.0, the_network_hangs, task_status=task_status)

    async with memory_pool(memory_relay, client_context, **ONE_SLOT_TO_WAIT_FOR) as pool:
        async with trio.open_nursery() as nursery:
            await nursery.start(lease_that_fails)
            relay_of(pool).breaker.failed(trio.current_time(), "a failure elsewhere")
            await trio.sleep(10.0)  # half-open
            with pytest.raises(sc.ConnectError):  # the trial waits 9 s, then its connect
                async with pool.connection():  # times out: that must still count
                    pass
        assert pool.breaker_state is OPEN


async def test_only_a_reply_proves_a_relay_that_stopped_answering(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
) -> None:
    # Opened by request timeouts; then a refused trial; then the relay is back, still
    # never answering: a spare that stays quiet must not close the breaker.
    options = {
        "min_idle": 1,
        "connect_timeout": 5.0,
        "request_timeout": 1.0,
        "breaker_failure_threshold": 2,
        "breaker_cooldown": 10.0,
    }
    async with memory_pool(memory_relay, client_context, **options) as pool:
        await trio.sleep(1.0)
        memory_relay.fault = Fault.HANG_AFTER_HANDSHAKE
        for _ in range(2):
            with pytest.raises(sc.RequestTimeout):
                async with pool.connection() as channel:
                    await echo(channel, b"x")
        assert pool.breaker_state is OPEN
        memory_relay.fault = Fault.REFUSE
        await relay_of(pool).close_idle("test")
        await trio.sleep(10.0)
        with pytest.raises(sc.ConnectError):  # a checkout's trial: refused
            async with pool.connection():
                pass
        memory_relay.fault = Fault.HANG_AFTER_HANDSHAKE
        await trio.sleep(20.0)
        assert pool.breaker_state is not CLOSED


class AppError(Exception):
    """An application's own error inside a block."""
