"""The public testing kit (`trio_securechannel.testing`), each fault provoked against a real
pool over loopback, as a user's tests would use it; and its pytest fixtures."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay, RelayStream, open_relay

from helpers import books, wait_until


def pool_for(relay: LoopbackRelay, **options: Any) -> Any:
    return sc.open_pool(relay.address, **{"ssl_context": relay.client_context(), **options})


async def round_trip(pool: sc.SecureChannelPool, line: bytes = b"ping") -> bytes:
    async with pool.connection() as channel:
        await channel.send_line(line)
        return await channel.receive_line()


async def message_echoed(channel: sc.WebSocketChannel, message: str) -> bool:
    """Whether the relay sent ``message`` back, as an echo does."""
    await channel.send_message(message)
    return await channel.get_message() == message


# -- the fixtures and the defaults ------------------------------------------------------


async def test_the_tls_relay_fixture_echoes_and_counts(tls_relay: LoopbackRelay) -> None:
    async with pool_for(tls_relay) as pool:
        assert await round_trip(pool, b"hello") == b"hello"
        assert await round_trip(pool, b"again") == b"again"  # the same channel, reused
    assert tls_relay.address == f"127.0.0.1:{tls_relay.port}"
    assert (tls_relay.accepted, tls_relay.handshakes) == (1, 1)
    assert tls_relay.requests == 2
    assert tls_relay.bytes_received == tls_relay.bytes_sent == len(b"hello\nagain\n")
    await wait_until(lambda: tls_relay.active == 0)
    assert tls_relay.endings == {"close_notify": 1}  # the pool closed it with a TLS close


async def test_the_wss_relay_fixture_echoes_messages(wss_relay: LoopbackRelay) -> None:
    assert wss_relay.address == f"wss://127.0.0.1:{wss_relay.port}/ws"
    async with pool_for(wss_relay) as pool, pool.websocket() as channel:
        assert await message_echoed(channel, "hello")
    assert wss_relay.upgrades == 1
    assert wss_relay.request_paths == ["/ws"]
    await wait_until(lambda: not wss_relay.sessions)
    assert wss_relay.close_codes == {1000: 1}  # the pool said goodbye with a close frame


async def test_a_client_context_trusts_its_own_relay_only() -> None:
    async with open_relay() as first, open_relay() as second:
        assert first.ca is not second.ca  # a throwaway CA each, unless one is shared
        async with pool_for(first, ssl_context=second.client_context()) as pool:
            with pytest.raises(sc.ConnectError) as info:
                await round_trip(pool)
        assert info.value.phase == "tls"


# -- faults at the accept and the handshake ---------------------------------------------


async def test_refuse_closes_the_port_and_ending_it_serves_on_the_same_port() -> None:
    async with open_relay() as relay, pool_for(relay, breaker_failure_threshold=100) as pool:
        port = relay.port
        relay.fault = Fault.REFUSE
        with pytest.raises(sc.ConnectError, match="refused") as info:
            await round_trip(pool)
        assert info.value.phase == "tcp"
        assert relay.accepted == 0  # nothing listened
        relay.fault = Fault.NONE
        assert relay.port == port
        assert await round_trip(pool) == b"ping"
        assert relay.accepted == 1


@pytest.mark.parametrize("fault", [Fault.RESET_ON_ACCEPT, Fault.CLOSE_ON_ACCEPT])
async def test_faults_on_accept_end_the_connection_before_tls(fault: Fault) -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.fault = fault
        with pytest.raises(sc.ConnectError) as info:
            await round_trip(pool)
        assert info.value.phase == "tls"
        assert (relay.accepted, relay.handshakes) == (1, 0)


async def test_no_tls_takes_the_hello_and_never_answers() -> None:
    async with open_relay() as relay, pool_for(relay, connect_timeout=0.3) as pool:
        relay.fault = Fault.NO_TLS
        began = trio.current_time()
        with pytest.raises(sc.ConnectError) as info:
            await round_trip(pool)
        assert info.value.phase == "timeout"  # the pool's own deadline ended it
        assert trio.current_time() - began >= 0.3
        await wait_until(lambda: relay.endings["before_tls"] == 1)
        assert relay.handshakes == 0


async def test_drop_after_handshake_completes_tls_then_closes() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.fault = Fault.DROP_AFTER_HANDSHAKE
        with pytest.raises(trio.BrokenResourceError):
            await round_trip(pool)
        assert relay.handshakes == 1
        assert relay.requests == 0


async def test_hang_after_handshake_takes_requests_and_answers_none() -> None:
    async with open_relay() as relay, pool_for(relay, request_timeout=0.2) as pool:
        relay.fault = Fault.HANG_AFTER_HANDSHAKE
        with pytest.raises(sc.RequestTimeout):
            await round_trip(pool)
        assert relay.handshakes == 1
        assert relay.requests == 1  # taken
        assert relay.bytes_sent == 0  # never answered


async def test_hang_meets_a_connection_already_open() -> None:
    async with open_relay() as relay, pool_for(relay, request_timeout=0.2) as pool:
        assert await round_trip(pool) == b"ping"
        relay.fault = Fault.HANG_AFTER_HANDSHAKE
        with pytest.raises(sc.RequestTimeout):
            await round_trip(pool)
        assert relay.accepted == 1  # the same connection, answered before, not now


async def test_stop_reading_lets_the_clients_sends_fill_the_buffers() -> None:
    async with open_relay() as relay, pool_for(relay, request_timeout=0.3) as pool:
        relay.fault = Fault.STOP_READING
        with pytest.raises(sc.RequestTimeout):
            async with pool.connection() as channel:
                await channel.send_all(b"x" * 50_000_000)  # never taken: it blocks
        assert relay.requests == 0


async def test_reset_mid_reply_sends_half_then_resets() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.fault = Fault.RESET_MID_REPLY
        got = bytearray()

        async def read_all() -> None:
            async with pool.connection() as channel:
                await channel.send_all(b"0123456789")
                while True:
                    got.extend(await channel.receive_some())

        with pytest.raises(trio.BrokenResourceError):
            await read_all()
        assert got == b"01234"  # half of the reply, then the RST


async def test_reject_upgrade_answers_403() -> None:
    async with open_relay(websocket=True) as relay, pool_for(relay) as pool:
        relay.fault = Fault.REJECT_UPGRADE
        with pytest.raises(sc.ConnectError, match="403") as info:
            async with pool.websocket():
                pass
        assert info.value.phase == "websocket"
        assert relay.upgrades == 1
        assert not relay.sessions


# -- settings that combine with any fault ------------------------------------------------


async def test_latency_delays_every_reply() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.latency = 0.2
        began = trio.current_time()
        assert await round_trip(pool) == b"ping"
        assert trio.current_time() - began >= 0.2


async def test_replies_in_pieces_take_more_than_one_read() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.piece_size = 4
        async with pool.connection() as channel:
            await channel.send_all(b"0123456789\n")
            first = await channel.receive_some()
            assert first == b"0123"  # a TLS record each piece, apart
            assert first + await channel.receive_line() == b"0123456789"


async def test_idle_close_after_closes_quiet_connections_with_a_tls_close() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.idle_close_after = 0.1
        assert await round_trip(pool) == b"ping"
        await wait_until(lambda: relay.endings["idle_close"] == 1)
        assert await round_trip(pool) == b"ping"  # the pool saw it go: a new connection
        assert relay.accepted == 2


async def test_push_sends_unasked_bytes_to_every_connection() -> None:
    async with (
        open_relay() as relay,
        pool_for(relay) as pool,
        pool.connection() as first,
        pool.connection() as second,
    ):
        for channel in (first, second):  # the relay has finished its side of each handshake
            await channel.send_line(b"hello")
            assert await channel.receive_line() == b"hello"
        assert await relay.push(b"news\n") == 2
        assert await first.receive_line() == b"news"
        assert await second.receive_line() == b"news"


async def test_push_over_wss_sends_a_message_to_every_session() -> None:
    async with (
        open_relay(websocket=True) as relay,
        pool_for(relay) as pool,
        pool.websocket() as channel,
    ):
        assert await message_echoed(channel, "hello")
        assert await relay.push("news") == 1
        assert await channel.get_message() == "news"


async def test_push_behind_reply_arrives_with_the_reply() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.push_behind_reply = b"pushed\n"
        async with pool.connection() as channel:
            await channel.send_line(b"ping")
            assert await channel.receive_line() == b"ping"
            assert await channel.receive_line() == b"pushed"
        assert relay.requests == 1


async def test_late_tickets_reach_an_idle_pooled_channel_and_it_is_still_reused() -> None:
    tls13 = ssl.TLSVersion.TLSv1_3
    async with open_relay() as relay:
        relay.tickets_after = 0.1
        context = relay.client_context()
        context.minimum_version = tls13
        async with sc.open_pool(relay.address, ssl_context=context) as pool:
            assert await round_trip(pool) == b"ping"
            await trio.sleep(0.3)  # the tickets arrive while the channel sits in the pool
            assert await round_trip(pool) == b"ping"
            assert books(pool)["opened_total"] == 1


async def test_kill_connections_resets_a_lent_channel() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:

        async def killed_while_lent() -> None:
            async with pool.connection() as channel:
                await channel.send_line(b"ping")
                assert await channel.receive_line() == b"ping"
                relay.kill_connections()
                await channel.receive_some()

        with pytest.raises(trio.BrokenResourceError):
            await killed_while_lent()
        await wait_until(lambda: relay.endings["reset"] == 1)


async def test_stop_and_restart_on_the_same_port() -> None:
    async with open_relay() as relay, pool_for(relay, breaker_failure_threshold=100) as pool:
        assert await round_trip(pool) == b"ping"
        port = relay.port
        relay.stop()
        with pytest.raises(sc.ConnectError, match="refused"):
            await round_trip(pool)
        relay.restart()
        assert relay.port == port
        assert await round_trip(pool) == b"ping"
        assert relay.accepted == 2


# -- handlers, memory, bad input ---------------------------------------------------------


async def test_a_handler_of_the_users_serves_raw_tls() -> None:
    async def shout(stream: RelayStream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data.upper())

    async with open_relay(shout) as relay, pool_for(relay) as pool:
        assert await round_trip(pool, b"quiet") == b"QUIET"


async def test_a_handler_of_the_users_serves_wss() -> None:
    async def count(session: WebSocketConnection) -> None:
        number = 0
        while True:
            await session.get_message()
            number += 1
            await session.send_message(str(number))

    async with (
        open_relay(count, websocket=True) as relay,
        pool_for(relay) as pool,
        pool.websocket() as channel,
    ):
        for expected in ("1", "2"):
            await channel.send_message("x")
            assert await channel.get_message() == expected


async def test_a_handlers_error_comes_out_of_open_relay_itself() -> None:
    async def broken(stream: RelayStream) -> None:
        raise LookupError("a bug in the handler")

    async def run() -> None:
        async with open_relay(broken) as relay, pool_for(relay) as pool:
            await round_trip(pool)

    with pytest.raises(LookupError, match="a bug in the handler"):  # not in a group
        await run()


async def test_an_error_in_the_block_comes_out_bare() -> None:
    with pytest.raises(KeyError):
        async with open_relay():
            raise KeyError("the test's own")


async def test_in_memory_on_the_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    async with open_relay(listen=False) as relay:
        relay.connect_delay = 0.25
        relay.latency = 1.0
        options: dict[str, Any] = {"open_transport": relay.open_memory_stream}
        async with pool_for(relay, **options) as pool:
            began = trio.current_time()
            assert await round_trip(pool) == b"ping"
            assert trio.current_time() - began == pytest.approx(1.25)  # exact, virtual
            relay.fault = Fault.REFUSE
            pool_options = {"breaker_failure_threshold": 100}
            async with pool_for(relay, **options, **pool_options) as other:
                with pytest.raises(sc.ConnectError, match="refused"):
                    await round_trip(other)
        assert relay.connect_times == [0.0, pytest.approx(1.25)]


def test_bad_settings_are_refused_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match="handler must be an async function"):
        LoopbackRelay("echo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path must start with '/'"):
        LoopbackRelay(websocket=True, path="ws")
    relay = LoopbackRelay()
    with pytest.raises(ValueError, match="'hang' is not a valid Fault"):
        relay.fault = "hang"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="REJECT_UPGRADE needs a wss:// relay"):
        relay.fault = Fault.REJECT_UPGRADE
    assert relay.fault is Fault.NONE


async def test_open_memory_stream_before_serving_says_so() -> None:
    with pytest.raises(RuntimeError, match="not serving"):
        await LoopbackRelay().open_memory_stream("127.0.0.1", 1)


async def test_a_handler_with_a_nursery_sees_the_client_leave_as_an_ending() -> None:
    # A connection ending under a handler's own nursery comes out in an exception group:
    # the relay takes it as the connection ending, not as a bug in the handler.
    async def ticking(stream: RelayStream) -> None:
        async def tick() -> None:
            while True:
                await stream.send_all(b"tick\n")
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            while await stream.receive_some():
                pass
            nursery.cancel_scope.cancel()

    async with open_relay(ticking) as relay:
        async with pool_for(relay) as pool, pool.connection() as channel:
            assert await channel.receive_line() == b"tick"
            relay.kill_connections()
        await wait_until(lambda: relay.endings["reset"] == 1)
        assert relay.active == 0


# -- what the review found ------------------------------------------------------------------


async def test_stop_then_restart_as_the_last_thing_in_the_block() -> None:
    for _ in range(20):  # the accept loop outlived serve()'s nursery: an AssertionError
        async with open_relay() as relay:
            relay.stop()
            relay.restart()


async def test_a_restart_onto_a_taken_port_raises_and_leaves_the_relay_down() -> None:
    async with open_relay() as relay:
        relay.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", relay.port))
            squatter.listen()
            with pytest.raises(OSError, match="in use"):
                relay.restart()
            assert relay.fault is Fault.REFUSE  # it says what it is: down
        relay.restart()  # the port is free again
        async with pool_for(relay) as pool:
            assert await round_trip(pool) == b"ping"


async def test_in_memory_ending_refuse_opens_no_socket() -> None:
    async with open_relay(listen=False) as relay:
        assert relay.address == "memory.invalid:443"  # never resolves: no stray dial
        relay.stop()
        relay.restart()
        assert relay.port == 443
        with socket.socket() as probe:  # nothing listens where a socket would have been
            assert probe.connect_ex(("127.0.0.1", 443)) != 0 or relay.accepted == 0
        options: dict[str, Any] = {"open_transport": relay.open_memory_stream}
        async with pool_for(relay, **options) as pool:
            assert await round_trip(pool) == b"ping"
        assert relay.accepted == 1


async def raw_tls_client(relay: LoopbackRelay) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(*relay.target)
    tls = trio.SSLStream(tcp, relay.client_context(), server_hostname="127.0.0.1")
    await tls.do_handshake()
    return tls


async def test_wss_clients_that_leave_before_or_during_the_upgrade_end_cleanly() -> None:
    async with open_relay(websocket=True) as relay:
        silent = await raw_tls_client(relay)  # TLS, then no upgrade request at all
        await silent.aclose()
        half = await raw_tls_client(relay)  # half a request, then gone
        await half.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await half.aclose()
        rude = await raw_tls_client(relay)  # a whole request, gone before the answer
        await rude.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Name: caf\xe9\r\n\r\n"  # a header that is not UTF-8
        )
        await trio.aclose_forcefully(rude)
        await wait_until(lambda: relay.active == 0)
        assert relay.endings["before_upgrade"] >= 2
        async with pool_for(relay) as pool, pool.websocket() as channel:  # still serving
            assert await message_echoed(channel, "still here")


async def test_close_sessions_does_not_wait_for_ever_on_a_silent_client() -> None:
    async with (
        open_relay(websocket=True) as relay,
        pool_for(relay) as pool,
        pool.websocket() as channel,
    ):
        assert await message_echoed(channel, "hello")
        began = trio.current_time()
        await relay.close_sessions(1001)  # the lent channel reads nothing meanwhile
        assert trio.current_time() - began < 2.0


async def test_close_on_accept_closes_with_a_fin_not_a_reset() -> None:
    async with open_relay() as relay:
        relay.fault = Fault.CLOSE_ON_ACCEPT
        for _ in range(20):
            tcp = await trio.open_tcp_stream(*relay.target)
            await tcp.send_all(b"\x16\x03\x01 a ClientHello, unread")
            assert await tcp.receive_some() == b""  # end of stream, not ECONNRESET
            await tcp.aclose()
        await wait_until(lambda: relay.endings["closed_on_accept"] == 20)


@pytest.mark.parametrize(
    ("fault", "ending"),
    [
        (Fault.RESET_ON_ACCEPT, "reset_on_accept"),
        (Fault.CLOSE_ON_ACCEPT, "closed_on_accept"),
        (Fault.DROP_AFTER_HANDSHAKE, "dropped"),
    ],
)
async def test_every_connection_has_an_ending(fault: Fault, ending: str) -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        relay.fault = fault
        with pytest.raises((sc.ConnectError, trio.BrokenResourceError)):
            await round_trip(pool)
        await wait_until(lambda: relay.active == 0)
        assert relay.endings == {ending: 1}


async def test_wss_endings_say_how_each_session_went() -> None:
    async with open_relay(websocket=True) as relay:
        async with pool_for(relay) as pool:
            async with pool.websocket() as channel:
                assert await message_echoed(channel, "one")
            relay.kill_connections()
            await wait_until(lambda: relay.active == 0)
            assert relay.endings == {"reset": 1}
            async with pool.websocket() as channel:
                assert await message_echoed(channel, "two")
        await wait_until(lambda: relay.active == 0)
        assert relay.endings == {"reset": 1, "ws_close": 1}  # the pool's close frame
        assert relay.close_codes == {1006: 1, 1000: 1}  # the reset one had no close frame


async def test_stop_reading_reaches_a_read_already_waiting() -> None:
    async with (
        open_relay() as relay,
        pool_for(relay, request_timeout=5) as pool,
        pool.connection() as channel,
    ):
        await channel.send_line(b"first")
        assert await channel.receive_line() == b"first"
        await wait_until(lambda: relay.requests == 1)
        relay.fault = Fault.STOP_READING  # the relay's read waits already
        await trio.sleep(0.05)
        await channel.send_line(b"unread")
        with trio.move_on_after(0.3) as waited:
            await channel.receive_line()
        assert waited.cancelled_caught
        assert relay.requests == 1


async def test_idle_close_after_reaches_a_read_already_waiting() -> None:
    async with open_relay() as relay, pool_for(relay) as pool:
        assert await round_trip(pool) == b"ping"
        await trio.sleep(0.05)  # the relay waits for the next request
        relay.idle_close_after = 0.1
        await wait_until(lambda: relay.endings["idle_close"] == 1, within=2.0)


async def test_late_tickets_come_on_their_own_and_hold_no_reply_back() -> None:
    async with open_relay() as relay:
        relay.tickets_after = 0.3
        tls = await raw_tls_client(relay)
        assert tls.version() == "TLSv1.3"
        began = trio.current_time()
        await trio.lowlevel.wait_readable(tls.transport_stream.socket)  # the tickets
        assert trio.current_time() - began >= 0.25
        await tls.send_all(b"ping")
        assert await tls.receive_some() == b"ping"
        await tls.aclose()

        relay.tickets_after = 5.0  # a reply before then takes them along, undelayed
        tls = await raw_tls_client(relay)
        began = trio.current_time()
        await tls.send_all(b"ping")
        assert await tls.receive_some() == b"ping"
        assert trio.current_time() - began < 1.0
        await tls.aclose()


def test_push_behind_reply_is_refused_over_wss() -> None:
    with pytest.raises(ValueError, match="push_behind_reply is for raw TLS"):
        LoopbackRelay(websocket=True).push_behind_reply = b"x"


def test_a_client_context_for_a_tls_context_of_your_own_needs_its_ca() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(ValueError, match="give open_relay\\(\\) its ca too"):
        LoopbackRelay(tls_context=context).client_context()


async def test_late_tickets_for_a_connection_already_gone_are_dropped() -> None:
    async with open_relay() as relay:
        relay.tickets_after = 0.1
        tls = await raw_tls_client(relay)
        await trio.aclose_forcefully(tls)  # gone before its tickets
        await trio.sleep(0.2)  # the relay crashed here, taking the test with it
        async with pool_for(relay) as pool:
            assert await round_trip(pool) == b"ping"
