"""Relays that are sick, not dead: FAULTS.md rows 27-33, provoked by misbehaving relays of
our own over real TLS on 127.0.0.1 (tests/test_middleboxes.py has the third-party ones).

A relay that completes TLS and then never answers, or hangs up at once; one that pushes a
message right behind a reply; one that comes back after being down; one that refuses while
another is only busy; and a client context weakened after the pool checked it.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

import pytest
import trio
import trio.testing

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay, RelayStream

from conftest import new_relay
from helpers import books, closed_port, echo, relay_of, wait_until


async def start_relays(nursery: trio.Nursery, count: int) -> list[LoopbackRelay]:
    relays = [new_relay() for _ in range(count)]
    for relay in relays:
        await nursery.start(relay.serve)
    return relays


def name(relay: LoopbackRelay) -> str:
    return f"127.0.0.1:{relay.port}"


# -- row 27: a relay that completes TLS, then never answers ---------------------------------


async def test_a_hung_relay_times_out_opens_its_breaker_and_gets_no_traffic(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    hung, *healthy = await start_relays(nursery, 3)
    hung.fault = Fault.HANG_AFTER_HANDSHAKE
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "request_timeout": 0.2,
        "breaker_failure_threshold": 3,
        "breaker_cooldown": 60.0,
    }
    timeouts: list[sc.RequestTimeout] = []
    served = 0
    async with sc.open_pool([relay.target for relay in (hung, *healthy)], **options) as pool:
        # One caller after another: relay choice steers away from the hung relay after its
        # first timeout, but now and then explores it again, until its breaker opens.
        with trio.fail_after(30):
            while len(timeouts) < 3 or served < 300:
                try:
                    async with pool.connection() as channel:
                        assert await echo(channel, b"ping") == b"ping"
                    served += 1
                except sc.RequestTimeout as exc:
                    timeouts.append(exc)
        status = pool.status()
    assert len(timeouts) == 3  # the threshold, then no more traffic for the cooldown
    assert hung.requests == 3
    for timeout in timeouts:
        assert isinstance(timeout, TimeoutError)
        assert timeout.endpoint == name(hung)
        assert timeout.timeout == 0.2
        assert name(hung) in str(timeout)
        assert "0.2s" in str(timeout)
    hung_status = status["endpoints"][0]
    assert hung_status["breaker"]["state"] == "open"
    assert hung_status["errors_by_kind"] == {"timeout": 3}  # each counted once
    assert hung_status["connections"]["closed_by_reason"] == {"error": 3}  # discarded
    assert status["errors_total"] == 3
    assert healthy[0].bytes_sent + healthy[1].bytes_sent == 4 * served


async def test_a_callers_own_timeout_blames_nobody(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.HANG_AFTER_HANDSHAKE
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with trio.move_on_after(0.1):  # no request_timeout: the caller's own deadline
            async with pool.connection() as channel:
                await echo(channel, b"ping")
        status = pool.status()
    assert status["errors_total"] == 0
    assert status["breaker"]["consecutive_failures"] == 0
    assert status["connections"]["closed_by_reason"] == {"aborted": 1}


async def test_each_checkout_can_set_or_lift_the_time_limit(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.HANG_AFTER_HANDSHAKE
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        began = trio.current_time()
        with pytest.raises(sc.RequestTimeout) as info:
            async with pool.connection(timeout=0.1) as channel:
                await echo(channel, b"ping")
        assert 0.1 <= trio.current_time() - began < 1.0
        assert info.value.timeout == 0.1
        assert channel.closed  # discarded
        with pytest.raises(ValueError, match="timeout"):
            pool.connection(timeout=0)
        with pytest.raises(ValueError, match="timeout"):
            pool.connection(timeout=math.nan)
    options: dict[str, Any] = {"ssl_context": client_context, "request_timeout": 0.05}
    async with sc.open_pool(relay.target, **options) as pool:
        with trio.move_on_after(0.3) as unlimited:
            async with pool.connection(timeout=math.inf) as channel:
                await echo(channel, b"ping")  # hangs: only the caller's scope ends it
        assert unlimited.cancelled_caught
        assert pool.status()["errors_total"] == 0


async def test_the_time_limit_counts_from_the_checkout(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.HANG_AFTER_HANDSHAKE
    options: dict[str, Any] = {"ssl_context": client_context, "request_timeout": 0.3}
    async with sc.open_pool(relay.target, **options) as pool, pool.connection() as channel:
        await trio.sleep(0.2)  # the block's own work counts against the limit
        began = trio.current_time()
        with pytest.raises(sc.RequestTimeout):
            await echo(channel, b"ping")
        assert trio.current_time() - began < 0.2


async def test_a_send_the_relay_will_not_take_times_out(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.STOP_READING  # TLS, then reads nothing: our send fills the buffers
    options: dict[str, Any] = {"ssl_context": client_context, "request_timeout": 0.3}
    async with sc.open_pool(relay.target, **options) as pool:
        with pytest.raises(sc.RequestTimeout):
            async with pool.connection() as channel:
                await channel.send_all(b"x" * (8 << 20))
        assert pool.status()["errors_by_kind"] == {"timeout": 1}


# -- row 28: a relay that completes TLS, then hangs up ---------------------------------------


async def test_a_relay_that_drops_every_session_is_not_hammered_by_spares(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.DROP_AFTER_HANDSHAKE  # a TLS terminator whose backend is down
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "min_idle": 5,
        "breaker_failure_threshold": 3,
        "breaker_cooldown": 0.5,
    }
    async with sc.open_pool(relay.target, **options) as pool:
        began = trio.current_time()
        await trio.sleep(3.0)
        elapsed = trio.current_time() - began
        status = pool.status()
    # Before: 290-375 handshakes a second. Now: the threshold, the spares opened at once,
    # and one trial per cooldown.
    bound = 3 + 5 + math.ceil(elapsed / 0.5)
    assert relay.handshakes <= bound, (relay.handshakes, bound)
    assert status["breaker"]["opened_total"] >= 1
    assert set(status["errors_by_kind"]) == {"dropped"}
    assert status["connections"]["idle"] == 0


async def test_a_relay_that_hangs_up_on_every_request_opens_the_breaker(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.DROP_AFTER_HANDSHAKE
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "breaker_failure_threshold": 3,
        "breaker_cooldown": 60.0,
    }
    replies: list[bytes] = []
    refused = 0
    async with sc.open_pool(relay.target, **options) as pool:
        for _ in range(20):
            try:
                async with pool.connection() as channel:
                    await channel.send_all(b"ping")
                    replies.append(bytes(await channel.receive_some()))
            except sc.CircuitOpen:
                refused += 1
            except trio.BrokenResourceError:
                replies.append(b"(reset)")
        status = pool.status()
    assert len(replies) == 3  # the threshold: then the breaker keeps callers away
    assert refused == 17
    assert relay.handshakes == 3
    # Each hang-up counted once: end-of-file on the reply, or a reset on the send.
    assert set(status["errors_by_kind"]) <= {"dropped", "io"}
    assert status["errors_total"] == 3
    assert status["breaker"]["state"] == "open"


# -- row 32: a relay back after being down ----------------------------------------------------


@pytest.mark.parametrize("down_for", [120.0, 125.0, 130.0, 140.0])
async def test_spares_are_back_within_a_moment_of_the_relay(
    autojump_clock: trio.testing.MockClock,
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
    down_for: float,
) -> None:
    memory_relay.fault = Fault.REFUSE
    options: dict[str, Any] = {
        "min_idle": 5,
        "breaker_failure_threshold": 5,
        "breaker_cooldown": 10.0,
    }
    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=memory_relay.open_memory_stream,
        **options,
    ) as pool:
        # Long enough for the spare backoff to reach its 30 s cap; whenever the relay is
        # back, the next trial comes with the next cooldown's end, not a backoff later.
        await trio.sleep(down_for)
        memory_relay.fault = Fault.NONE
        with trio.fail_after(10.0 + 1.0):  # the next trial, one cooldown at most
            await wait_until(lambda: pool.breaker_state is sc.BreakerState.CLOSED, within=11.0)
        closed_at = trio.current_time()
        await wait_until(lambda: books(pool)["idle"] == 5, within=30.0)
        assert trio.current_time() - closed_at < 1.0  # not a backoff later


# -- row 33: one relay refusing, the other busy ----------------------------------------------


async def test_callers_wait_their_turn_at_a_busy_relay_rather_than_see_a_refusal(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    (busy,) = await start_relays(nursery, 1)
    refusing = ("127.0.0.1", closed_port())
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "max_connections": 1,
        "acquire_timeout": 5.0,
        "breaker_failure_threshold": 100,
    }
    outcomes: list[str] = []
    async with sc.open_pool([refusing, busy.target], **options) as pool:

        async def caller() -> None:
            try:
                async with pool.connection() as channel:
                    assert await echo(channel, b"served") == b"served"
                outcomes.append("served")
            except sc.SecureChannelError as exc:
                outcomes.append(type(exc).__name__)

        # The busy relay's only slot is held for 0.3 s.
        async with trio.open_nursery() as callers, pool.connection() as held:
            assert str(held.endpoint) == name(busy)
            for _ in range(5):
                callers.start_soon(caller)
            await trio.sleep(0.3)
    assert outcomes == ["served"] * 5


# -- row 29: a message pushed right behind a reply --------------------------------------------


async def test_a_message_pushed_behind_a_reply_never_reaches_the_next_caller(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.push_behind_reply = b'{"method":"blockchain.headers.subscribe"}\n'
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        for number in range(20):
            payload = b"request %d" % number
            async with pool.connection() as channel:
                assert await echo(channel, payload) == payload  # its own reply, exactly
            if number == 0:
                await trio.sleep(0.05)
                # The push was read off the socket with the reply: it waits in TLS's
                # buffer, where the socket no longer shows it.
                assert channel._tls_incoming is not None
                assert channel._tls_incoming.pending > 0
                assert not channel.ssl_stream.transport_stream.socket.is_readable()
        # Found at the next checkout every time.
        assert books(pool)["closed_by_reason"] == {"stale": 19}


async def test_a_channel_whose_pushed_record_is_half_there_is_not_lent_again(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The push's record is split across TCP segments: half of it waits when the next
    # checkout looks, the rest comes later. That channel must never be lent again (its
    # TLS stream lost the half the checkout read), not even by a second look.
    relay.push_behind_reply = b"PUSH" * 50
    relay.push_split_after = 0.3
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as first:
            assert await echo(first, b"one") == b"one"
        await trio.sleep(0.05)
        async with pool.connection() as second:
            assert second is not first
            relay.push_behind_reply = None
            assert await echo(second, b"two") == b"two"
        status = pool.status()
    assert status["connections"]["closed_by_reason"] == {"stale": 1}
    assert status["errors_total"] == 0


# -- the client context, checked at every connect ---------------------------------------------


@pytest.mark.parametrize(
    ("weaken", "named"),
    [
        (lambda ctx: setattr(ctx, "check_hostname", False), "check_hostname"),
        (
            lambda ctx: setattr(ctx, "minimum_version", ssl.TLSVersion.MINIMUM_SUPPORTED),
            "minimum_version",
        ),
    ],
    ids=["hostname check off", "any TLS version allowed"],
)
async def test_a_context_weakened_after_open_is_refused_at_the_next_connect(
    relay: LoopbackRelay, client_context: ssl.SSLContext, weaken: Any, named: str
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel:
            assert await echo(channel, b"before") == b"before"
        await relay_of(pool).close_idle("test")  # the next checkout must connect
        accepted = relay.accepted
        weaken(client_context)
        with pytest.raises(ValueError, match=f"{named}.*changed after the pool was opened"):
            async with pool.connection():
                pass
        assert relay.accepted == accepted  # no connection was made with it
        status = pool.status()
        assert status["connections"]["opening"] == status["connections"]["in_use"] == 0
        assert status["breaker"]["consecutive_failures"] == 0  # not the relay's fault


# -- trials that prove nothing, and relays that speak first -----------------------------------


async def test_a_quiet_spare_does_not_prove_a_relay_that_never_answers(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.HANG_AFTER_HANDSHAKE
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "request_timeout": 0.1,
        "breaker_failure_threshold": 1,
        "breaker_cooldown": 0.3,
        "min_idle": 1,
    }
    async with sc.open_pool(relay.target, **options) as pool:
        await wait_until(lambda: books(pool)["idle"] == 1)
        with pytest.raises(sc.RequestTimeout):
            async with pool.connection() as channel:
                await echo(channel, b"ping")
        assert pool.breaker_state is sc.BreakerState.OPEN
        await relay_of(pool).close_idle("test")  # no idle channel to carry the trial
        await trio.sleep(0.6)  # the cooldown is over: the spare keeper makes no trial
        assert pool.status()["breaker"]["state"] == "half_open"
        handshakes = relay.handshakes
        with pytest.raises(sc.RequestTimeout):  # a checkout is the trial: no reply,
            async with pool.connection() as channel:
                await echo(channel, b"ping")
        assert pool.status()["breaker"]["state"] == "open"  # ... so it reopens
        assert relay.handshakes == handshakes + 1


async def test_a_relay_that_speaks_first_is_not_hammered_while_half_open(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # A relay with a banner right after TLS: every spare is spent ("unexpected data"),
    # so a spare never proves it; the spare keeper backs off in every breaker state.
    relay.fault = Fault.CLOSE_ON_ACCEPT
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "min_idle": 1,
        "breaker_failure_threshold": 2,
        "breaker_cooldown": 0.5,
    }
    async with sc.open_pool(relay.target, **options) as pool:
        await wait_until(lambda: pool.breaker_state is sc.BreakerState.OPEN)
        relay.handler = greet_then_echo
        await trio.sleep(2.0)
    assert relay.handshakes <= 5  # backing off 0.5 s, 1 s, 2 s ...: before, hundreds


async def greet_then_echo(stream: RelayStream) -> None:
    """A relay handler: a banner right after TLS, as SMTP servers send, then echo."""
    await stream.send_all(b"220 relay ready\r\n")
    while data := await stream.receive_some():
        await stream.send_all(data)
