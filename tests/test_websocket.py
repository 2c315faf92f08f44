"""wss:// relays: WebSocket channels against a real trio-websocket server over TLS (trustme).

The FAULTS rows that apply to any channel (6, 7, 10, 11, 17), provoked for WebSocket
channels, plus what only they have: upgrade refusals, ping/pong keepalive and close frames.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection
from wsproto import WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, TextMessage

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import make_server_context, new_relay
from helpers import books, relay_of, wait_until
from ws_relay import Proxy, ScriptedRelay, accept, next_message

TLS = trio.SSLStream[trio.SocketStream]


async def close_on_first_message(session: WebSocketConnection) -> None:
    """A relay handler: an overloaded relay, closing each session on its first message."""
    await session.get_message()
    await session.aclose(1011, "overloaded")


async def take_messages_answer_none(session: WebSocketConnection) -> None:
    """A relay handler: upgraded, takes every message, answers none."""
    while True:
        await session.get_message()


@pytest.fixture
async def ws_relay(nursery: trio.Nursery) -> AsyncIterator[LoopbackRelay]:
    relay = new_relay(websocket=True, path="/ws")
    await nursery.start(relay.serve)
    yield relay
    relay.stop()


@pytest.fixture
async def proxy(nursery: trio.Nursery, ws_relay: LoopbackRelay) -> Proxy:
    """A TCP proxy in front of ``ws_relay``; its URL is `proxied_url`."""
    proxy = Proxy(ws_relay.port)
    await nursery.start(proxy.serve)
    return proxy


def proxied_url(proxy: Proxy) -> str:
    return f"wss://127.0.0.1:{proxy.port}/ws"


def closed_by(pool: sc.SecureChannelPool) -> dict[str, int]:
    reasons: dict[str, int] = books(pool)["closed_by_reason"]
    return reasons


async def call(channel: sc.WebSocketChannel, message: str | bytes) -> str | bytes:
    await channel.send_message(message)
    return await channel.get_message()


def unread_bytes(channel: sc.WebSocketChannel) -> bool:
    """Whether bytes wait in the channel's socket (or TLS buffer) that nobody has read."""
    tls = channel.ssl_stream
    return bool(tls.pending()) or bool(tls.transport_stream.socket.is_readable())


def reader_tasks() -> list[trio.lowlevel.Task]:
    """Every WebSocket reader task alive in this run."""
    found, todo = [], [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        assert task is not None
        if task.name.startswith("WebSocket reader for "):
            found.append(task)
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return found


async def test_messages_round_trip_on_one_reused_channel(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        ids = set()
        for i in range(20):
            async with pool.websocket() as channel:
                assert await call(channel, f"text {i}") == f"text {i}"
                assert await call(channel, b"\x00binary\xff") == b"\x00binary\xff"
                ids.add(channel.id)
        assert isinstance(channel, sc.WebSocketChannel)
        assert len(ids) == 1  # reused (LIFO), not reopened
        assert ws_relay.upgrades == 1
        assert channel.round_trips_total == 40
        assert (
            channel.bytes_sent
            == channel.bytes_received
            == sum(len(f"text {i}") + len(b"\x00binary\xff") for i in range(20))
        )
        status = pool.status()
        assert status["protocol"] == "websocket"
        assert status["target"] == ws_relay.url
        assert status["latency"]["round_trip"]["count"] == 40
        assert status["latency"]["handshake"]["count"] == 1
        assert f'endpoint="{ws_relay.url}"' in pool.metrics_text().decode()


async def test_many_tasks_share_a_few_websocket_channels(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    replies: list[bool] = []

    async def worker(n: int) -> None:
        async with pool.websocket() as channel:
            replies.append(await call(channel, f"message {n} " * 50) == f"message {n} " * 50)

    async with sc.open_pool(
        ws_relay.url, ssl_context=client_context, max_connections=5, acquire_timeout=30
    ) as pool:
        async with trio.open_nursery() as nursery:
            for n in range(300):
                nursery.start_soon(worker, n)
        assert replies == [True] * 300
        assert ws_relay.max_sessions <= 5
        assert books(pool)["in_use"] == 0
        assert books(pool)["opened_total"] == 5


async def test_reader_tasks_run_in_the_pools_nursery_and_end_with_it(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context, min_idle=2) as pool:
        await wait_until(lambda: books(pool)["idle"] == 2)
        readers = reader_tasks()
        assert len(readers) == 2
        # In the nursery open_pool opens in the caller's task: none hidden per connection.
        assert all(reader.parent_nursery is relay_of(pool)._nursery for reader in readers)
        assert relay_of(pool)._nursery.parent_task is trio.lowlevel.current_task()
    assert reader_tasks() == []


async def test_a_discarded_channel_with_unread_messages_ends_its_reader_at_once(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async def fail_with_messages_unread() -> None:
        async with pool.websocket() as channel:
            assert await call(channel, "subscribe") == "subscribe"
            for n in range(3):  # more than the reader can hand over: it blocks
                await ws_relay.push(f"update {n}")
            await trio.sleep(0.05)
            raise KeyError("the application failed")

    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        with pytest.raises(KeyError):
            await fail_with_messages_unread()
        assert closed_by(pool) == {"aborted": 1}
        await wait_until(lambda: reader_tasks() == [], within=1)


async def test_a_refused_upgrade_is_a_connect_error_and_a_breaker_failure(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.fault = Fault.REJECT_UPGRADE
    async with sc.open_pool(
        ws_relay.url, ssl_context=client_context, max_connections=2, breaker_failure_threshold=2
    ) as pool:
        for attempt in (1, 2):
            with pytest.raises(sc.ConnectError) as info:
                async with pool.websocket():
                    pytest.fail("no channel was opened")
            assert info.value.phase == "websocket"
            assert "WebSocket upgrade refused: HTTP 403" in str(info.value)
            assert isinstance(info.value.__cause__, ConnectionRejected)
            assert pool.status()["breaker"]["consecutive_failures"] == attempt
        with pytest.raises(sc.CircuitOpen):
            async with pool.websocket():
                pytest.fail("the breaker is open")
        assert ws_relay.upgrades == 2
        assert 'kind="websocket"} 2.0' in pool.metrics_text().decode()
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        assert reader_tasks() == []  # each reader ended with its refusal; the pool lives on


async def test_a_relay_that_does_not_speak_websocket_fails_the_upgrade(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # A raw TLS echo relay sends the upgrade request back: not an HTTP response.
    url = f"wss://127.0.0.1:{relay.port}/ws"
    async with sc.open_pool(url, ssl_context=client_context, connect_timeout=5) as pool:
        with trio.fail_after(4), pytest.raises(sc.ConnectError) as info:
            async with pool.websocket():
                pytest.fail("no channel was opened")
        assert info.value.phase == "websocket"
        assert "WebSocket upgrade failed" in str(info.value)
        assert books(pool)["opening"] == 0
        await wait_until(lambda: relay.active == 0)  # its connection was closed


async def test_an_upgrade_never_answered_times_out_and_closes_the_connection(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    ws_relay.fault = Fault.HANG_AFTER_HANDSHAKE
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, connect_timeout=0.5
    ) as pool:
        began = trio.current_time()
        with pytest.raises(sc.ConnectError) as info:
            async with pool.websocket():
                pytest.fail("no channel was opened")
        assert info.value.phase == "timeout"
        assert trio.current_time() - began == pytest.approx(0.5, abs=0.3)
        assert books(pool)["opening"] == 0
        await wait_until(lambda: proxy.open_connections == 0)


async def test_cancelled_during_the_upgrade_frees_the_slot(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    ws_relay.fault = Fault.HANG_AFTER_HANDSHAKE
    async with sc.open_pool(proxied_url(proxy), ssl_context=client_context) as pool:
        with trio.move_on_after(0.3) as scope:
            async with pool.websocket():
                pytest.fail("no channel was opened")
        assert scope.cancelled_caught
        assert ws_relay.upgrades == 1
        assert books(pool)["opening"] == books(pool)["in_use"] == 0
        await wait_until(lambda: proxy.open_connections == 0)
        ws_relay.fault = Fault.NONE
        async with pool.websocket() as channel:
            assert await call(channel, "after") == "after"


async def test_a_relay_closing_a_lent_channel_is_an_error_counted_once(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    lent: list[sc.WebSocketChannel] = []

    async def ask() -> None:
        async with pool.websocket() as channel:
            lent.append(channel)
            await call(channel, "hello")

    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        ws_relay.handler = close_on_first_message
        with pytest.raises(trio.BrokenResourceError, match=r"1011 INTERNAL_ERROR: overloaded"):
            await ask()
        assert lent[0].errors == {"ws_close": 1}
        status = pool.status()
        assert status["errors_by_kind"] == {"ws_close": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        assert closed_by(pool) == {"error": 1}
        ws_relay.handler = None  # echo again
        async with pool.websocket() as channel:
            assert await call(channel, "again") == "again"
        assert pool.status()["breaker"]["consecutive_failures"] == 0


async def test_a_reset_under_a_lent_channel_is_an_io_error(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    ws_relay.latency = 10

    async def reset_soon() -> None:
        await trio.sleep(0.1)
        proxy.reset_connections()

    async def ask() -> None:
        async with pool.websocket() as channel:
            await channel.send_message("slow")
            nursery.start_soon(reset_soon)
            await channel.get_message()

    async with sc.open_pool(proxied_url(proxy), ssl_context=client_context) as pool:
        with pytest.raises(trio.BrokenResourceError, match="lost"):
            await ask()
        assert pool.status()["errors_by_kind"] == {"io": 1}
        assert closed_by(pool) == {"error": 1}


async def test_an_idle_channel_the_relay_closed_is_replaced_at_checkout(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        await ws_relay.close_sessions(1001)
        await wait_until(first.has_pending_input)
        async with pool.websocket() as second:
            assert second is not first
            assert await call(second, "two") == "two"
        assert closed_by(pool) == {"stale": 1}
        assert pool.status()["errors_total"] == 0


async def test_a_message_pushed_to_an_idle_channel_makes_it_stale(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            assert await call(first, "subscribe") == "subscribe"
        await ws_relay.push("a notification for the last user")
        await wait_until(first.has_pending_input)
        async with pool.websocket() as second:
            assert second is not first
            assert await call(second, "mine") == "mine"  # never the notification
        assert closed_by(pool) == {"stale": 1}


async def test_an_unanswered_message_keeps_the_channel_out_of_the_pool(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.latency = 0.2
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            await first.send_message("reply comes late")
        async with pool.websocket() as second:
            with trio.move_on_after(0.05):  # gave up waiting: the reply is still coming
                await call(second, "also late")
        assert second is not first
        ws_relay.latency = 0
        async with pool.websocket() as third:
            assert third not in (first, second)
            assert await call(third, "mine") == "mine"
        assert closed_by(pool) == {"unanswered": 2}


async def test_messages_must_be_str_or_bytes(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with (
        sc.open_pool(ws_relay.url, ssl_context=client_context) as pool,
        pool.websocket() as channel,
    ):
        with pytest.raises(TypeError, match="str or bytes, got int"):
            await channel.send_message(42)  # type: ignore[arg-type]
        assert channel.reusable
        assert await call(channel, "fine") == "fine"


async def test_keepalive_pings_find_a_black_holed_relay(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, connect_timeout=0.5, cleanup_interval=60
    ) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        upkeep = relay_of(pool)._upkeep
        await upkeep.clean()  # the pong comes back: kept
        assert books(pool)["idle"] == 1
        assert closed_by(pool) == {}
        proxy.black_hole = True
        began = trio.current_time()
        await upkeep.clean()
        assert trio.current_time() - began == pytest.approx(0.5, abs=0.3)
        assert closed_by(pool) == {"stale": 1}
        assert books(pool)["idle"] == 0
        proxy.black_hole = False
        async with pool.websocket() as second:
            assert await call(second, "two") == "two"
        assert pool.status()["errors_total"] == 0  # a keepalive miss is not an I/O error


async def test_the_periodic_cleanup_pass_does_the_keepalive(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy),
        ssl_context=client_context,
        min_idle=1,
        connect_timeout=0.3,
        cleanup_interval=0.2,
    ) as pool:
        await wait_until(lambda: books(pool)["idle"] == 1)
        await trio.sleep(0.5)  # passes come and go: the pongs come back
        assert closed_by(pool) == {}
        proxy.black_hole = True
        await wait_until(lambda: closed_by(pool) == {"stale": 1}, within=2)
        proxy.black_hole = False  # the spare keeper replaces it
        await wait_until(lambda: books(pool)["idle"] == 1 and books(pool)["opened_total"] == 2)


async def test_a_channel_lent_while_its_ping_goes_unanswered_is_not_pooled_again(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy),
        ssl_context=client_context,
        connect_timeout=0.5,
        cleanup_interval=60,
    ) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        proxy.black_hole = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_of(pool)._upkeep.clean)
            await trio.sleep(0.1)  # the ping is out
            async with pool.websocket() as lent:
                assert lent is first  # nothing told the pool yet
                await wait_until(lambda: not lent.reusable)
        assert closed_by(pool) == {"stale": 1}


async def test_shutdown_sends_close_frames_before_the_tls_close(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async def hold_through_the_shutdown(task_status: trio.TaskStatus[None]) -> None:
        async with pool.websocket() as lent:
            assert await call(lent, "in use at exit") == "in use at exit"
            task_status.started()
            await wait_until(lambda: pool.closed)
            await trio.sleep(0.1)  # given back while the shutdown waits for it

    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as a, pool.websocket() as b, pool.websocket() as c:
            for channel in (a, b, c):
                assert await call(channel, "warm") == "warm"
        await nursery.start(hold_through_the_shutdown)  # one of the three: two stay idle
        assert books(pool) | {"idle": 2, "in_use": 1, "opened_total": 3} == books(pool)
    # A relay that sees the TLS connection end before a close frame records 1006.
    await wait_until(lambda: sum(ws_relay.close_codes.values()) == 3)
    assert ws_relay.close_codes == {1000: 3}
    assert closed_by(pool) == {"shutdown": 3}
    assert reader_tasks() == []


async def test_the_shutdown_does_not_wait_for_a_black_holed_relay(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, min_idle=2, shutdown_timeout=3
    ) as pool:
        await wait_until(lambda: books(pool)["idle"] == 2)
        proxy.black_hole = True  # no close frame will come back
        began = trio.current_time()
    assert trio.current_time() - began < 0.3  # a close frame is sent, not a reply awaited
    assert reader_tasks() == []
    assert not pool.channels()
    await wait_until(lambda: proxy.open_connections == 0)


async def test_a_mixed_pool_routes_each_checkout_to_its_kind(
    relay: LoopbackRelay, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        [f"tls://127.0.0.1:{relay.port}", ws_relay.url], ssl_context=client_context
    ) as pool:
        for _ in range(5):
            async with pool.connection() as stream:
                assert isinstance(stream, sc.SecureChannel)
                await stream.send_all(b"raw")
                assert await stream.receive_some() == b"raw"
            async with pool.websocket() as ws:
                assert isinstance(ws, sc.WebSocketChannel)
                assert await call(ws, "framed") == "framed"
        protocols = {e["target"]: e["protocol"] for e in pool.status()["endpoints"]}
        assert protocols == {f"127.0.0.1:{relay.port}": "tls", ws_relay.url: "websocket"}
        assert relay.handshakes == 1
        assert ws_relay.upgrades == 1


async def test_asking_a_pool_for_a_kind_it_lacks_is_a_type_error(
    relay: LoopbackRelay, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        with pytest.raises(TypeError, match=r"only WebSocket .* pool\.websocket\(\)"):
            pool.connection()
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with pytest.raises(TypeError, match=r"no WebSocket .* pool\.connection\(\)"):
            pool.websocket()


async def test_websocket_checkouts_fail_over_to_a_relay_that_accepts(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    refusing = new_relay(websocket=True, path="/ws")
    await nursery.start(refusing.serve)
    refusing.fault = Fault.REJECT_UPGRADE
    async with sc.open_pool(
        [refusing.url, ws_relay.url], ssl_context=client_context, breaker_failure_threshold=2
    ) as pool:
        for i in range(20):
            async with pool.websocket() as channel:
                assert channel.endpoint == sc.Endpoint.parse(ws_relay.url)
                assert await call(channel, f"m{i}") == f"m{i}"
        states = {e["target"]: e["breaker"]["state"] for e in pool.status()["endpoints"]}
        assert states == {refusing.url: "open", ws_relay.url: "closed"}
        assert refusing.upgrades == 2  # then its breaker kept checkouts away
    refusing.stop()


async def test_an_empty_message_awaits_its_reply_too(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.latency = 0.1
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            await first.send_message("")  # a real frame, whose (empty) reply is coming
            assert first.unanswered
        async with pool.websocket() as second:
            assert second is not first
            assert await call(second, "mine") == "mine"
        assert closed_by(pool) == {"unanswered": 1}


async def test_a_message_the_reader_has_not_read_yet_makes_the_channel_stale(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(proxied_url(proxy), ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            assert await call(first, "subscribe") == "subscribe"
        proxy.hold = True
        await ws_relay.push("for the last user")
        await wait_until(lambda: proxy.holding > 0)
        proxy.hold = False
        proxy.deliver_held_now()  # in the socket, and no task of ours has run since
        time.sleep(0.02)  # (loopback delivery)  # noqa: ASYNC251 - on purpose: nothing may run
        assert unread_bytes(first)  # the reader has not seen it: it is all in the socket
        assert first.has_pending_input()
        async with pool.websocket() as second:
            assert second is not first
            assert await call(second, "mine") == "mine"
        assert closed_by(pool) == {"stale": 1}


async def test_a_relay_that_accepts_and_then_closes_every_session_opens_its_breaker(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    closing = new_relay(websocket=True, path="/ws")
    await nursery.start(closing.serve)
    closing.handler = close_on_first_message
    # Alone, it opens its breaker after exactly the threshold: the upgrades succeeded,
    # but an upgrade is not a success the breaker counts.
    async with sc.open_pool(
        closing.url, ssl_context=client_context, breaker_failure_threshold=3
    ) as pool:
        for _ in range(3):
            with pytest.raises(trio.BrokenResourceError):
                await call_once(pool)
        with pytest.raises(sc.CircuitOpen):
            await call_once(pool)
        assert closing.upgrades == 3
    # Beside a good relay, it gets little traffic (an error weighs as a slow round trip),
    # and once its breaker opens, none.
    failures = 0
    async with sc.open_pool(
        [closing.url, ws_relay.url], ssl_context=client_context, breaker_failure_threshold=3
    ) as pool:
        for _ in range(400):
            try:
                await call_once(pool)
            except trio.BrokenResourceError:
                failures += 1  # lent, then closed: reaches its caller, by design
        states = {e["target"]: e["breaker"]["state"] for e in pool.status()["endpoints"]}
        assert states[closing.url] == "open"
        assert failures == 3
        # Opening forgot its latency (the error's weight came first): back from its
        # cooldown, it is tried afresh rather than starved.
        assert pool._relays[0].latency_estimate is None
    closing.stop()


async def call_once(pool: sc.SecureChannelPool) -> None:
    async with pool.websocket() as channel:
        assert await call(channel, "ask") == "ask"


async def test_a_relay_that_closes_right_after_the_upgrade_is_a_connect_failure(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async def accept_and_close(stream: TLS, ws: WSConnection) -> None:
        await stream.send_all(ws.send(AcceptConnection()) + ws.send(CloseConnection(1013)))
        await next_message(stream, ws)

    relay = ScriptedRelay(make_server_context(), accept_and_close)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.url, ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError, match="closed the WebSocket right after the upgrade"):
            async with pool.websocket():
                pytest.fail("no channel was lent")
    # With another relay to go to, the caller sees nothing of it.
    async with sc.open_pool([relay.url, ws_relay.url], ssl_context=client_context) as pool:
        for _ in range(5):
            async with pool.websocket() as channel:
                assert await call(channel, "ok") == "ok"


async def test_a_relay_pinging_inside_its_close_handshake_does_not_stall_the_close(
    nursery: trio.Nursery, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    async def echo_and_ping_while_closing(stream: TLS, ws: WSConnection) -> None:
        await accept(stream, ws)
        while isinstance(message := await next_message(stream, ws), Message):
            await stream.send_all(ws.send(TextMessage(data=message.data)))
        relay.close_codes[message.code if message else 1006] += 1
        if isinstance(message, CloseConnection):
            # Legal (control frames may come before the close reply), though wsproto
            # would not send it: a raw ping frame, payload "?".
            await stream.send_all(b"\x89\x01?")
            await trio.sleep(0.05)
            await stream.send_all(ws.send(message.response()))

    relay = ScriptedRelay(make_server_context(), echo_and_ping_while_closing)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.url, ssl_context=client_context, shutdown_timeout=3) as pool:
        async with pool.websocket() as channel:
            assert await call(channel, "x") == "x"
        began = trio.current_time()
    assert trio.current_time() - began < 0.5  # not shutdown_timeout
    assert relay.close_codes == {1000: 1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_keepalive_on_a_connection_that_dies_returns_at_once(
    nursery: trio.Nursery,
    ws_relay: LoopbackRelay,
    proxy: Proxy,
    client_context: ssl.SSLContext,
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, connect_timeout=3, cleanup_interval=60
    ) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        proxy.black_hole = True

        async def reset_soon() -> None:
            await trio.sleep(0.1)
            proxy.reset_connections()

        nursery.start_soon(reset_soon)
        began = trio.current_time()
        await relay_of(pool)._upkeep.clean()  # its ping is out when the connection dies
        assert trio.current_time() - began < 1  # not connect_timeout
        assert closed_by(pool) == {"stale": 1}
        with pytest.raises(trio.ClosedResourceError):
            await first.ping()


async def test_a_websocket_retired_at_give_back_frees_its_slot_at_once(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, max_connections=1
    ) as pool:
        async with pool.websocket() as first:
            await first.send_message("unanswered")
            proxy.black_hole = True  # the relay will never answer the close frame
            began = trio.current_time()
        assert trio.current_time() - began < 0.1  # no round trip waited for
        assert first.closed
        proxy.black_hole = False
        await wait_until(lambda: proxy.open_connections == 0)  # its connection is gone
        async with pool.websocket() as second:  # acquire_timeout=0: the slot is free
            assert await call(second, "two") == "two"
        assert closed_by(pool) == {"unanswered": 1}


async def test_the_exit_waits_for_lent_channels_and_nothing_else(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async def give_back_late(task_status: trio.TaskStatus[None]) -> None:
        async with pool.websocket() as lent:
            await lent.send_message("unanswered")
            task_status.started()
            await wait_until(lambda: pool.closed)
            proxy.black_hole = True
            await trio.sleep(0.5)  # given back halfway through the shutdown

    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, shutdown_timeout=1
    ) as pool:
        await nursery.start(give_back_late)
        began = trio.current_time()
    # Done when the lent channel came back: its close waits for nothing.
    assert trio.current_time() - began == pytest.approx(0.5, abs=0.2)
    assert reader_tasks() == []


async def test_upgrade_headers_and_subprotocols_reach_the_relay(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.subprotocol = "v2.relay"
    async with sc.open_pool(
        ws_relay.url,
        ssl_context=client_context,
        websocket_headers={"Authorization": "Bearer hunter2"},
        websocket_subprotocols=["v3.relay", "v2.relay"],
    ) as pool:
        async with pool.websocket() as channel:
            assert channel.subprotocol == "v2.relay"
            assert await call(channel, "hi") == "hi"
        assert ws_relay.request_headers["authorization"] == "Bearer hunter2"
        assert ws_relay.offered_subprotocols == ("v3.relay", "v2.relay")
        assert "hunter2" not in repr(pool.config) + str(pool.status())


async def test_a_message_over_the_size_limit_closes_the_websocket(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    big = "x" * 5000
    async with sc.open_pool(
        ws_relay.url, ssl_context=client_context, websocket_max_message_size=4096
    ) as pool:
        for _ in range(pool.config.breaker_failure_threshold):
            with pytest.raises(trio.BrokenResourceError, match="over websocket_max_message_size"):
                await call_big(pool, big)
        assert closed_by(pool) == {"error": 5}
        assert pool.status()["errors_by_kind"] == {"too_big": 5}
        assert pool.status()["breaker"]["consecutive_failures"] == 0  # our limit, not its fault
    async with sc.open_pool(
        ws_relay.url, ssl_context=client_context, websocket_max_message_size=8192
    ) as pool:
        await call_big(pool, big)


async def call_big(pool: sc.SecureChannelPool, message: str) -> None:
    async with pool.websocket() as channel:
        assert await call(channel, message) == message


async def test_a_keepalive_meeting_a_channel_closed_meanwhile_lets_it_go(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The pass lists the idle channels; a checkout may close one (found unfit) before its
    # ping starts. That must not end the pool.
    from trio_securechannel._upkeep import _keep_alive

    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as channel:
            assert await call(channel, "one") == "one"
        await channel.aclose()
        await _keep_alive(channel, 1.0)
        assert not channel.reusable


async def send_a_fragment_then_the_rest(stream: TLS, ws: WSConnection, sent: list[str]) -> None:
    await stream.send_all(ws.send(TextMessage(data="pushed ", message_finished=False)))
    sent.append("part")
    await trio.sleep(0.3)
    await stream.send_all(ws.send(TextMessage(data="late", message_finished=True)))
    sent.append("rest")


async def send_a_frame_header_then_the_rest(stream: TLS, ws: WSConnection, sent: list[str]) -> None:
    frame = ws.send(TextMessage(data="NOTIFICATION"))
    await stream.send_all(frame[:2])  # its header, in a TLS record of its own
    sent.append("part")
    await trio.sleep(0.3)
    await stream.send_all(frame[2:])
    sent.append("rest")


@pytest.mark.parametrize(
    "push",
    [send_a_fragment_then_the_rest, send_a_frame_header_then_the_rest],
    ids=["fragment", "frame header"],
)
async def test_a_push_half_received_makes_an_idle_channel_stale(
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
    push: Callable[[TLS, WSConnection, list[str]], Awaitable[None]],
) -> None:
    sent: list[str] = []

    async def echo_then_push(stream: TLS, ws: WSConnection) -> None:
        await accept(stream, ws)
        while isinstance(message := await next_message(stream, ws), Message):
            await stream.send_all(ws.send(TextMessage(data=message.data)))
            if message.data == "subscribe":
                await push(stream, ws, sent)

    relay = ScriptedRelay(make_server_context(), echo_then_push)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            assert await call(first, "subscribe") == "subscribe"
        # The reader holds part of the push (nothing of it is left unread) and has made
        # no message of it yet (the rest has not been sent).
        await wait_until(lambda: sent == ["part"])
        await trio.sleep(0.05)  # (loopback delivery, and the reader's turn)
        await wait_until(lambda: not unread_bytes(first))
        assert sent == ["part"]
        assert first.has_pending_input()
        async with pool.websocket() as second:
            assert second is not first
            assert await call(second, "mine") == "mine"
        assert closed_by(pool) == {"stale": 1}


@pytest.mark.parametrize(
    "frames",
    [
        [b"\x81\x00"],  # empty text frame
        [b"\x81\x05hello", b"\x8a\x04pong"],  # a message and a pong in one chunk
        [b"\x82\x7e\x01\x00" + bytes(256)],  # 16-bit length
        [b"\x82\x7f" + (70000).to_bytes(8, "big") + bytes(70000)],  # 64-bit length
        [b"\x81\x85abcd" + bytes(5)],  # masked (a relay should not, but may)
    ],
)
def test_frame_watch_finds_every_boundary(frames: list[bytes]) -> None:
    from trio_securechannel._frames import FrameWatch

    stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + b"".join(frames)
    boundaries = {len(stream) - len(b"".join(frames[i:])) for i in range(len(frames) + 1)}
    for split in range(1, len(stream)):  # the same bytes, cut in two at every place
        watch = FrameWatch(None)  # type: ignore[arg-type]  # (only its parsing is used)
        watch.watch(stream[:split])
        answer_end = stream.index(b"\r\n\r\n") + 4
        assert watch.mid_frame == (split > answer_end and split not in boundaries), split
        watch.watch(stream[split:])
        assert not watch.mid_frame


async def test_a_lease_abandoned_before_its_reply_is_no_success_for_the_breaker(
    ws_relay: LoopbackRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async def reset_soon() -> None:
        await trio.sleep(0.1)
        proxy.reset_connections()

    async with sc.open_pool(proxied_url(proxy), ssl_context=client_context) as pool:
        ws_relay.latency = 10
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset_soon)
            with pytest.raises(trio.BrokenResourceError):
                await call_once(pool)
        assert pool.status()["breaker"]["consecutive_failures"] == 1
        with pytest.raises(trio.TooSlowError):
            await ask_with_a_deadline(pool)
        assert pool.status()["breaker"]["consecutive_failures"] == 1  # not vouched for
        ws_relay.latency = 0
        await call_once(pool)
        assert pool.status()["breaker"]["consecutive_failures"] == 0


async def ask_with_a_deadline(pool: sc.SecureChannelPool) -> None:
    async with pool.websocket() as channel:
        await channel.send_message("no reply in time")
        with trio.fail_after(0.05):
            await channel.get_message()


async def test_a_connect_cut_short_by_the_pools_exit_is_pool_closed(
    nursery: trio.Nursery, ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.fault = Fault.HANG_AFTER_HANDSHAKE  # upgrades never answered
    outcome: list[BaseException] = []

    async def check_out(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            async with pool.websocket():
                pytest.fail("no channel was opened")
        except (sc.PoolClosed, sc.ConnectError) as exc:
            outcome.append(exc)

    async with sc.open_pool(ws_relay.url, ssl_context=client_context, shutdown_timeout=0.2) as pool:
        await nursery.start(check_out)
        await wait_until(lambda: ws_relay.upgrades == 1)
        began = trio.current_time()
    assert trio.current_time() - began < 1  # about shutdown_timeout, not connect_timeout
    await wait_until(lambda: bool(outcome), within=1)
    assert isinstance(outcome[0], sc.PoolClosed)
    assert pool.status()["breaker"]["consecutive_failures"] == 0
    assert reader_tasks() == []  # the upgrade's session task ended with the pool


async def test_a_websocket_block_cancelled_mid_wait_discards_its_channel(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # FAULTS row 11 for messages: the cancellation comes out bare, the channel is not
    # reused, and the reply that comes later reaches nobody.
    ws_relay.latency = 0.2
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        with trio.move_on_after(0.05) as scope:
            async with pool.websocket() as first:
                await first.send_message("late reply")
                await first.get_message()
        assert scope.cancelled_caught
        assert first.closed
        assert closed_by(pool) == {"aborted": 1}
        assert pool.status()["errors_total"] == 0
        ws_relay.latency = 0
        async with pool.websocket() as second:
            assert second is not first
            assert await call(second, "mine") == "mine"
        assert books(pool)["in_use"] == 0


def test_frame_watch_counts_messages_fragments_and_the_close() -> None:
    from trio_securechannel._frames import FrameWatch

    changes: list[bool] = []
    watch = FrameWatch(None, on_change=lambda: changes.append(watch.close_received))  # type: ignore[arg-type]
    watch.watch(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    watch.watch(b"\x80\x00")  # a stray continuation frame: no message
    assert (watch.messages_arrived, watch.message_in_progress) == (0, False)
    watch.watch(b"\x01\x03abc")  # a text message's first fragment
    assert (watch.messages_arrived, watch.message_in_progress) == (0, True)
    watch.watch(b"\x89\x00")  # a ping between its fragments
    assert (watch.messages_arrived, watch.message_in_progress) == (0, True)
    watch.watch(b"\x80\x02de" + b"\x82\x01x")  # its last fragment, and a binary message
    assert (watch.messages_arrived, watch.message_in_progress) == (2, False)
    assert not watch.close_received
    assert changes == []
    watch.watch(b"\x88\x02\x03\xe8")  # a close frame (1000)
    assert watch.close_received
    assert changes == [True]
    assert not watch.mid_frame


async def test_a_relay_gone_before_answering_the_upgrade_fails_it_at_once(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    async def hang_up(stream: TLS, ws: WSConnection) -> None:
        await trio.lowlevel.checkpoint()  # the upgrade request read: the relay leaves

    relay = ScriptedRelay(make_server_context(), hang_up)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.url, ssl_context=client_context) as pool:
        began = trio.current_time()
        with pytest.raises(sc.ConnectError, match="closed the connection during the WebSocket"):
            async with pool.websocket():
                pytest.fail("no channel was opened")
        assert trio.current_time() - began < 1  # not connect_timeout (10 s)
        assert pool.status()["breaker"]["consecutive_failures"] == 1
        assert books(pool)["opening"] == 0


async def test_a_garbled_upgrade_answer_does_not_quote_the_request(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The raw TLS echo relay sends the request (and its credentials) back.
    async with sc.open_pool(
        f"wss://127.0.0.1:{relay.port}/ws",
        ssl_context=client_context,
        websocket_headers={"Authorization": "Bearer hunter2"},
    ) as pool:
        with pytest.raises(sc.ConnectError, match="not a WebSocket upgrade answer") as info:
            async with pool.websocket():
                pytest.fail("no channel was opened")
        assert "hunter2" not in f"{info.value} {info.value.__cause__}"


async def test_a_relay_closing_with_1009_itself_is_a_ws_close(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    async def refuse_the_first_message(stream: TLS, ws: WSConnection) -> None:
        await accept(stream, ws)
        await next_message(stream, ws)
        await stream.send_all(ws.send(CloseConnection(1009, "too big for me")))
        await next_message(stream, ws)  # the client's answer

    relay = ScriptedRelay(make_server_context(), refuse_the_first_message)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.url, ssl_context=client_context) as pool:
        with pytest.raises(trio.BrokenResourceError, match="1009 MESSAGE_TOO_BIG: too big"):
            await call_once(pool)
        status = pool.status()
        assert status["errors_by_kind"] == {"ws_close": 1}  # not too_big: not our limit
        assert status["breaker"]["consecutive_failures"] == 1


async def test_a_close_waits_for_the_relays_close_frame_then_closes_tls_cleanly(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    endings: list[object] = []

    async def upgrade_slowly_and_answer_the_close(stream: TLS, ws: WSConnection) -> None:
        await trio.sleep(0.2)  # the upgrade's round trip: the close may take two of them
        await accept(stream, ws)
        while isinstance(message := await next_message(stream, ws), Message):
            await stream.send_all(ws.send(TextMessage(data=message.data)))
        assert isinstance(message, CloseConnection)
        endings.append(message.code)
        with trio.move_on_after(0.1) as answering:  # (well within the client's patience)
            await stream.receive_some()  # the client leaving without the answer
        endings.append("waited" if answering.cancelled_caught else "did not wait")
        await stream.send_all(ws.send(message.response()))
        try:
            endings.append("close_notify" if await stream.receive_some() == b"" else "data")
        except trio.BrokenResourceError:
            endings.append("ragged")  # the client closed TCP without a close_notify

    relay = ScriptedRelay(make_server_context(), upgrade_slowly_and_answer_the_close)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as channel:
            assert await call(channel, "x") == "x"
            await channel.send_message("unanswered")  # so the channel is closed, not pooled
        await wait_until(lambda: len(endings) == 3, within=1)
        assert endings == [1000, "waited", "close_notify"]  # its close frame, then TLS's
        assert closed_by(pool) == {"unanswered": 1}


class Sabotaged(trio.abc.Stream):
    """A TCP stream whose reads start failing with a bug (not an I/O error) on demand."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.broken = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.broken:
            raise ValueError("a bug under the reader")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_reader_that_crashes_ends_its_channel_not_the_pool(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    streams: list[Sabotaged] = []

    async def open_transport(host: str, port: int) -> trio.abc.Stream:
        streams.append(Sabotaged(await trio.open_tcp_stream(host, port)))
        return streams[-1]

    async with sc.open_pool(
        ws_relay.url, ssl_context=client_context, open_transport=open_transport
    ) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        streams[0].broken = True
        await ws_relay.push("the reader will fail on this")
        await wait_until(first.has_pending_input)
        async with pool.websocket() as second:  # the pool lives on
            assert second is not first
            assert await call(second, "two") == "two"
        assert closed_by(pool) == {"stale": 1}
    failures = [r for r in caplog.records if "reader for" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING]
    assert "ValueError('a bug under the reader')" in failures[0].getMessage()


async def test_a_websocket_relay_that_never_answers_times_out_and_is_held_responsible(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.handler = take_messages_answer_none
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        began = trio.current_time()
        with pytest.raises(sc.RequestTimeout) as info:
            async with pool.websocket(timeout=0.2) as channel:
                await ask(channel, "blockchain.headers.subscribe")
        assert 0.2 <= trio.current_time() - began < 1.0
        assert info.value.endpoint == ws_relay.url
        assert channel.closed
        status = pool.status()
    assert status["errors_by_kind"] == {"timeout": 1}
    assert status["breaker"]["consecutive_failures"] == 1
    assert status["connections"]["closed_by_reason"] == {"error": 1}


async def ask(channel: sc.WebSocketChannel, message: str) -> str | bytes:
    await channel.send_message(message)
    return await channel.get_message()
