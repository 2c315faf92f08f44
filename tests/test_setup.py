"""The ``setup`` option: a relay's opening exchange (Electrum's ``server.version``) on each
new channel, before it is lent or pooled, over real TLS and WebSocket on 127.0.0.1.

A setup that raises, runs out of ``connect_timeout`` or leaves the channel mid-exchange is
a failure to connect (`ConnectError`, phase ``"setup"``), counted once for the breaker,
its slot freed and its channel closed; a caller's cancellation is not; a reused channel is
not set up again.
"""

from __future__ import annotations

import json
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.jsonrpc import (
    JsonRpcChannel,
    JsonRpcClient,
    RpcError,
    electrum_handshake,
)
from trio_securechannel.testing import LoopbackRelay, RelayStream

from helpers import assert_all_slots_free, books, echo, wait_until
from jsonrpc_relay import JsonRpcRelay

Setup = Callable[[sc.Channel], Awaitable[None]]


class ElectrumRelay(JsonRpcRelay):
    """A JSON-RPC relay with Electrum's rules that also counts the TLS sessions that ended,
    to see the pool close the channels it did not keep."""

    def __init__(self) -> None:
        super().__init__(electrum_rules=True)
        self.ended = 0

    async def _handle_tls(self, stream: RelayStream) -> None:
        try:
            await super()._handle_tls(stream)
        finally:
            self.ended += 1


@pytest.fixture
async def electrum(nursery: trio.Nursery) -> ElectrumRelay:
    relay = ElectrumRelay()
    await nursery.start(relay.serve_tls)
    return relay


def recording(setup: Setup, seen: list[sc.Channel]) -> Setup:
    """``setup``, noting each channel it is given."""

    async def wrapped(channel: sc.Channel) -> None:
        seen.append(channel)
        await setup(channel)

    return wrapped


async def refused_with_setup(pool: sc.SecureChannelPool) -> sc.ConnectError:
    """A checkout that fails in setup: its error."""
    with pytest.raises(sc.ConnectError) as info:
        async with pool.connection():
            pytest.fail("a channel whose setup failed was lent")
    assert info.value.phase == "setup"
    return info.value


async def assert_every_slot_serves(pool: sc.SecureChannelPool) -> None:
    """`assert_all_slots_free` for a JSON-RPC relay: nothing held, and ``max_connections``
    channels lent at once (with acquire_timeout=0: a leaked slot is a PoolExhausted),
    each answering a call."""
    assert books(pool)["in_use"] == books(pool)["opening"] == books(pool)["waiting"] == 0
    count = pool.config.max_connections
    lent: list[sc.SecureChannel] = []
    all_lent = trio.Event()

    async def hold(number: int) -> None:
        async with pool.connection() as channel:
            assert await JsonRpcChannel(channel).call("echo", number) == [number]
            lent.append(channel)
            if len(lent) == count:
                all_lent.set()
            await all_lent.wait()

    async with trio.open_nursery() as nursery:
        for number in range(count):
            nursery.start_soon(hold, number)
    assert len(set(lent)) == count
    assert books(pool)["in_use"] == 0


# -- the premise ---------------------------------------------------------------------------


async def test_an_electrum_relay_hangs_up_on_a_channel_that_was_not_set_up(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    # What setup is for: without server.version first, the first call ends the session.
    async with sc.open_pool(electrum.target, ssl_context=client_context) as pool:
        with pytest.raises(trio.BrokenResourceError):
            await JsonRpcClient(pool).call("echo", 1)
    assert electrum.hung_up == 1
    assert electrum.negotiated == 0


async def echo_at_once(pool: sc.SecureChannelPool, count: int) -> dict[int, object]:
    """``count`` JSON-RPC echo calls at once: what each got back."""
    client = JsonRpcClient(pool)
    results: dict[int, object] = {}

    async def call(number: int) -> None:
        results[number] = await client.call("echo", number)

    async with trio.open_nursery() as nursery:
        for number in range(count):
            nursery.start_soon(call, number)
    return results


# -- new channels, and only those, are set up ----------------------------------------------


async def test_setup_runs_once_on_each_new_channel_before_it_is_lent(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    seen: list[sc.Channel] = []
    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=recording(electrum_handshake("tests"), seen),
        max_connections=4,
        acquire_timeout=5,
    ) as pool:
        assert await echo_at_once(pool, 10) == {number: [number] for number in range(10)}
        opened = books(pool)["opened_total"]
        # Ten at once on four slots: four channels, the other six calls reused them.
        assert opened == 4
        assert electrum.hung_up == 0  # no call reached a relay before server.version
        assert electrum.negotiated == electrum.sessions == opened
        assert len(seen) == opened
        assert set(pool.channels()) == set(seen)  # every channel pooled was set up, once

        # Reused channels are not set up again.
        for number in range(5):
            assert await JsonRpcClient(pool).call("echo", number) == [number]
        assert books(pool)["opened_total"] == opened
        assert electrum.negotiated == electrum.calls["server.version"] == opened
        assert len(seen) == opened
        assert pool.status()["errors_total"] == 0
    assert electrum.hung_up == 0


async def test_spares_are_set_up_before_they_are_pooled(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=electrum_handshake("tests"),
        min_idle=2,
    ) as pool:
        await wait_until(lambda: books(pool)["idle"] == 2)
        # Before any checkout: both spares negotiated, and nothing else was sent.
        assert electrum.negotiated == electrum.sessions == 2
        assert electrum.calls == Counter({"server.version": 2})
        spares = set(pool.channels())
        async with pool.connection() as channel:
            assert channel in spares  # a spare, lent as it was: no second setup
            assert await JsonRpcChannel(channel).call("echo", "spare") == ["spare"]
        # The spare lent was replaced at once (min_idle): set up as well.
        await wait_until(lambda: books(pool)["opened_total"] == 3)
        assert electrum.hung_up == 0
        assert electrum.negotiated == electrum.sessions == 3


async def test_a_spare_whose_setup_fails_is_never_pooled(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=electrum_handshake("tests", "0.1"),
        min_idle=1,
        breaker_failure_threshold=1,
    ) as pool:
        await wait_until(lambda: pool.breaker_state is sc.BreakerState.OPEN)
        status = pool.status()
        assert status["connections"]["idle"] == status["connections"]["opened_total"] == 0
        assert status["errors_by_kind"] == {"setup": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        await wait_until(lambda: electrum.ended == electrum.sessions == 1)


# -- a setup that fails --------------------------------------------------------------------


async def test_a_refused_setup_is_a_connect_error_counted_once_until_the_breaker_opens(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    # One slot and acquire_timeout=0: a slot a failed setup leaked would turn the next
    # checkout away with PoolExhausted instead of trying again.
    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=electrum_handshake("tests", "0.1"),  # a version the relay refuses
        max_connections=1,
        breaker_failure_threshold=3,
    ) as pool:
        for attempt in range(1, 4):
            error = await refused_with_setup(pool)
            cause = error.__cause__
            assert type(cause) is RpcError
            assert cause.method == "server.version"
            assert "unsupported protocol version: 0.1" in cause.message
            assert "setup failed: RpcError" in str(error)
            assert "unsupported protocol version: 0.1" in str(error)
            assert error.endpoint == electrum.target
            # Once each: the relay answered, so nothing else was held against it.
            assert pool.status()["breaker"]["consecutive_failures"] == attempt
            assert books(pool)["in_use"] == books(pool)["opening"] == 0
        assert pool.breaker_state is sc.BreakerState.OPEN
        with pytest.raises(sc.CircuitOpen):
            async with pool.connection():
                pytest.fail("the open breaker let a checkout through")
        assert electrum.sessions == 3  # the breaker's refusal made no connect

        status = pool.status()
        assert status["errors_by_kind"] == {"setup": 3}
        assert status["errors_total"] == 3
        assert status["breaker"]["consecutive_failures"] == 3
        assert status["breaker"]["rejected_total"] == 1
        connections = status["connections"]
        assert connections["in_use"] == connections["opening"] == connections["waiting"] == 0
        # Never opened as far as the books go: neither lent nor pooled, so never closed.
        assert connections["opened_total"] == connections["closed_total"] == 0
        metrics = pool.metrics_text().decode()
        assert (
            f'securechannel_errors_total{{endpoint="{electrum.target}",kind="setup"}} 3.0'
            in metrics
        )
        await wait_until(lambda: electrum.ended == 3)  # each refused channel was closed


@pytest.mark.parametrize(
    ("broken", "cause", "kind"),
    [
        ("hangs up", trio.BrokenResourceError, "dropped"),
        ("breaks the protocol", sc.ProtocolError, "protocol"),
    ],
    ids=["relay hangs up", "relay breaks the protocol"],
)
async def test_a_channel_error_in_setup_is_one_failure_not_two(
    electrum: ElectrumRelay,
    client_context: ssl.SSLContext,
    broken: str,
    cause: type[Exception],
    kind: str,
) -> None:
    seen: list[sc.Channel] = []

    async def setup(channel: sc.Channel) -> None:
        rpc = JsonRpcChannel(channel)
        if broken == "hangs up":
            await rpc.call("echo", "too soon")  # before server.version: the relay hangs up
        else:
            await rpc.call("server.version", "tests", "1.4")
            await rpc.call("garbage")  # the relay's reply is not JSON

    # Threshold 2: the channel's own error reported as well would open it at once.
    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=recording(setup, seen),
        breaker_failure_threshold=2,
    ) as pool:
        error = await refused_with_setup(pool)
        assert type(error.__cause__) is cause
        assert seen[0].errors == Counter({kind: 1})  # the channel saw its error ...
        status = pool.status()
        assert status["breaker"]["state"] == "closed"  # ... the breaker one failure
        assert status["breaker"]["consecutive_failures"] == 1
        assert status["errors_by_kind"] == {"setup": 1}
        await refused_with_setup(pool)
        assert pool.breaker_state is sc.BreakerState.OPEN
        assert pool.status()["errors_by_kind"] == {"setup": 2}
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
    assert all(channel.closed for channel in seen)


async def test_a_setup_that_raises_is_a_connect_error_with_its_exception_as_cause(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    broken = True

    async def setup(channel: sc.Channel) -> None:
        assert isinstance(channel, sc.SecureChannel)
        if broken:
            raise RuntimeError("boom")
        assert await echo(channel, b"hello") == b"hello"

    async with sc.open_pool(
        relay.target, ssl_context=client_context, setup=setup, max_connections=2
    ) as pool:
        error = await refused_with_setup(pool)
        assert type(error.__cause__) is RuntimeError
        assert "setup failed: RuntimeError: boom" in str(error)
        status = pool.status()
        assert status["errors_by_kind"] == {"setup": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        # The relay saw the channel cut (no TLS goodbye: closed forcefully).
        await wait_until(lambda: relay.active == 0)
        assert relay.endings == Counter({"ragged": 1})

        broken = False
        await assert_all_slots_free(pool)
        # A channel set up vouches for the relay: its connect failure is forgotten.
        assert pool.status()["breaker"]["consecutive_failures"] == 0


# -- a setup that does not finish ----------------------------------------------------------


async def test_a_setup_slower_than_connect_timeout_fails_and_its_channel_is_closed(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    seen: list[sc.Channel] = []
    setup_began: list[float] = []

    async def setup(channel: sc.Channel) -> None:
        setup_began.append(trio.current_time())
        rpc = JsonRpcChannel(channel)
        await rpc.call("server.version", "tests", "1.4")
        await rpc.call("sleep", 0.6)  # the relay takes longer than connect_timeout

    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=recording(setup, seen),
        connect_timeout=0.3,
    ) as pool:
        error = await refused_with_setup(pool)
        # A budget of its own, after the handshake's: 0.3 s, not the relay's 0.6 s.
        assert 0.3 <= trio.current_time() - setup_began[0] < 0.55
        assert "setup did not finish within connect_timeout=0.3s" in str(error)
        assert error.__cause__ is None
        assert seen[0].closed
        status = pool.status()
        assert status["errors_by_kind"] == {"setup": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        # The relay's session ends: its late reply finds the connection gone.
        await wait_until(lambda: electrum.ended == 1, within=2)


async def test_a_cancelled_checkout_during_setup_frees_its_slot_and_blames_nobody(
    electrum: ElectrumRelay, client_context: ssl.SSLContext
) -> None:
    seen: list[sc.Channel] = []
    relay_delay = 0.5

    async def setup(channel: sc.Channel) -> None:
        rpc = JsonRpcChannel(channel)
        await rpc.call("server.version", "tests", "1.4")
        if relay_delay:
            await rpc.call("sleep", relay_delay)

    async with sc.open_pool(
        electrum.target,
        ssl_context=client_context,
        setup=recording(setup, seen),
        connect_timeout=5,
        max_connections=2,
    ) as pool:
        began = trio.current_time()
        # A ConnectError (or anything but the cancellation) would come out of this scope.
        with trio.move_on_after(0.2) as scope:
            async with pool.connection():
                pytest.fail("a channel was lent before its setup finished")
        assert scope.cancelled_caught
        assert trio.current_time() - began < 0.5  # not the relay's pace, nor connect_timeout
        assert len(seen) == 1
        assert seen[0].closed
        status = pool.status()
        assert status["breaker"]["state"] == "closed"
        assert status["breaker"]["consecutive_failures"] == 0
        assert status["errors_total"] == 0
        assert status["connections"]["in_use"] == status["connections"]["opening"] == 0
        await wait_until(lambda: electrum.ended == 1, within=2)

        relay_delay = 0.0
        await assert_every_slot_serves(pool)
        assert electrum.hung_up == 0


# -- a setup that leaves the channel mid-exchange ------------------------------------------


def server_version_line() -> bytes:
    request = {"jsonrpc": "2.0", "id": 1, "method": "server.version", "params": ["t", "1.4"]}
    return json.dumps(request).encode()


async def sends_without_reading(channel: sc.Channel) -> None:
    assert isinstance(channel, sc.SecureChannel)
    await channel.send_line(server_version_line())


async def gives_up_on_a_reply(channel: sc.Channel) -> None:
    rpc = JsonRpcChannel(channel)
    await rpc.call("server.version", "tests", "1.4")
    with trio.move_on_after(0.05):  # a read cut short: the reply may come half read
        await rpc.call("sleep", 1)


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (sends_without_reading, "setup left the channel with a request unanswered"),
        (gives_up_on_a_reply, "setup left the channel unusable (cancelled)"),
    ],
    ids=["request unanswered", "read cancelled"],
)
async def test_a_setup_that_leaves_a_reply_on_its_way_fails_the_connect(
    electrum: ElectrumRelay, client_context: ssl.SSLContext, setup: Setup, words: str
) -> None:
    # The reply would reach whoever the channel is lent to next.
    seen: list[sc.Channel] = []
    async with sc.open_pool(
        electrum.target, ssl_context=client_context, setup=recording(setup, seen)
    ) as pool:
        error = await refused_with_setup(pool)
        assert words in str(error)
        assert error.__cause__ is None
        assert seen[0].closed
        status = pool.status()
        assert status["errors_by_kind"] == {"setup": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        assert books(pool)["opened_total"] == 0


async def test_a_setup_that_leaves_bytes_unread_fails_the_connect(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async def setup(channel: sc.Channel) -> None:
        assert isinstance(channel, sc.SecureChannel)
        await channel.send_all(b"ready\nhalf a line")  # echoed in one record
        assert await channel.receive_line() == b"ready"  # the rest waits in the buffer

    async with sc.open_pool(relay.target, ssl_context=client_context, setup=setup) as pool:
        error = await refused_with_setup(pool)
        assert "setup left the channel with 11 bytes unread" in str(error)
        assert pool.status()["errors_by_kind"] == {"setup": 1}
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        await wait_until(lambda: relay.active == 0)


async def reads_part_of_a_reply(channel: sc.Channel) -> None:
    assert isinstance(channel, sc.SecureChannel)
    await channel.send_line(server_version_line())
    assert await channel.receive_some(5) == b'{"jso'  # the rest waits in TLS, not in a buffer


async def takes_one_reply_of_two(channel: sc.Channel) -> None:
    assert isinstance(channel, sc.WebSocketChannel)
    echo_request = {"jsonrpc": "2.0", "id": 2, "method": "echo", "params": ["late"]}
    await channel.send_message(server_version_line().decode())
    await channel.send_message(json.dumps(echo_request))
    await channel.get_message()  # answers "the" request: unanswered is False again
    await wait_until(channel.has_pending_input)  # the second reply is in, untaken


@pytest.mark.parametrize(
    ("serve", "setup"),
    [("serve_tls", reads_part_of_a_reply), ("serve_wss", takes_one_reply_of_two)],
    ids=["tls: part of a reply", "wss: one reply of two"],
)
async def test_a_setup_that_leaves_reply_data_unread_fails_the_connect(
    nursery: trio.Nursery, client_context: ssl.SSLContext, serve: str, setup: Setup
) -> None:
    # Lent as it is, the next call would read the rest as its own reply, and the relay
    # would be blamed for it (a ProtocolError, a failure for its breaker).
    relay = JsonRpcRelay(electrum_rules=True)
    await nursery.start(getattr(relay, serve))
    target = relay.url if serve == "serve_wss" else relay.target
    async with sc.open_pool(target, ssl_context=client_context, setup=setup) as pool:
        with pytest.raises(sc.ConnectError, match="unread") as info:
            await JsonRpcClient(pool).call("echo", "user")
        assert info.value.phase == "setup"
        assert pool.status()["errors_by_kind"] == {"setup": 1}


# -- WebSocket relays ----------------------------------------------------------------------


async def test_setup_runs_on_websocket_channels_after_the_upgrade(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    relay = JsonRpcRelay(electrum_rules=True)
    await nursery.start(relay.serve_wss)
    seen: list[sc.Channel] = []
    async with sc.open_pool(
        relay.url,
        ssl_context=client_context,
        setup=recording(electrum_handshake("tests"), seen),
        max_connections=2,
        acquire_timeout=5,
    ) as pool:
        assert await echo_at_once(pool, 6) == {number: [number] for number in range(6)}
        assert seen
        assert all(type(channel) is sc.WebSocketChannel for channel in seen)
        assert relay.hung_up == 0
        assert relay.negotiated == relay.sessions == len(seen) == books(pool)["opened_total"]

    # And a refused setup fails the connect there too, closing the WebSocket it upgraded.
    seen.clear()
    async with sc.open_pool(
        relay.url,
        ssl_context=client_context,
        setup=recording(electrum_handshake("tests", "0.1"), seen),
    ) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.websocket():
                pytest.fail("a channel whose setup failed was lent")
        assert info.value.phase == "setup"
        assert type(info.value.__cause__) is RpcError
        assert pool.status()["errors_by_kind"] == {"setup": 1}
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        assert seen[0].closed


# -- validation ----------------------------------------------------------------------------


def test_a_setup_that_is_not_callable_is_refused() -> None:
    bad: object = 123
    with pytest.raises(TypeError, match="setup must be an async callable, got 123"):
        sc.open_pool("relay.example.com:443", setup=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="setup"):
        sc.PoolConfig(setup=bad)  # type: ignore[arg-type]


async def test_a_setup_that_is_not_async_is_our_mistake_not_the_relays(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    relay = JsonRpcRelay()
    await nursery.start(relay.serve_tls)

    def not_async(channel: sc.Channel) -> None:
        pass

    async with sc.open_pool(
        relay.target,
        ssl_context=client_context,
        setup=not_async,  # type: ignore[arg-type]
    ) as pool:
        with pytest.raises(TypeError, match="setup must be an async function"):
            await JsonRpcClient(pool).call("echo")
        assert pool.status()["breaker"]["consecutive_failures"] == 0
        assert books(pool)["opening"] == books(pool)["in_use"] == 0
