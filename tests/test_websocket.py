"""wss:// relays: WebSocket channels against a real trio-websocket server over TLS (trustme).

The FAULTS rows that apply to any channel (6, 7, 10, 11, 17), provoked for WebSocket
channels, plus what only they have: upgrade refusals, ping/pong keepalive and close frames.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest
import trio
from trio_websocket import ConnectionRejected
from ws_relay import Proxy, WebSocketRelay

import trio_securechannel as sc

from conftest import make_server_context
from helpers import books, wait_until
from relay import Relay


@pytest.fixture
async def ws_relay(nursery: trio.Nursery) -> AsyncIterator[WebSocketRelay]:
    relay = WebSocketRelay(make_server_context())
    await nursery.start(relay.serve)
    yield relay
    relay.stop()


@pytest.fixture
async def proxy(nursery: trio.Nursery, ws_relay: WebSocketRelay) -> Proxy:
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
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context, min_idle=2) as pool:
        await wait_until(lambda: books(pool)["idle"] == 2)
        readers = reader_tasks()
        assert len(readers) == 2
        # In the pool's nursery for channel tasks, which is the child of the nursery that
        # open_pool opens in the caller's task: nothing hidden per connection.
        channel_tasks = pool._relay._nursery
        assert all(reader.parent_nursery is channel_tasks for reader in readers)
        host = channel_tasks.parent_task
        assert host.parent_nursery is not None
        assert host.parent_nursery.parent_task is trio.lowlevel.current_task()
    assert reader_tasks() == []


async def test_a_discarded_channel_with_unread_messages_ends_its_reader_at_once(
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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


async def test_a_websocket_retired_at_give_back_closes_in_the_background(
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, shutdown_timeout=0.5
    ) as pool:
        async with pool.websocket() as channel:
            await channel.send_message("unanswered")
            proxy.black_hole = True  # the relay's close frame will never come
            began = trio.current_time()
        assert trio.current_time() - began < 0.1  # the block did not wait for it
        assert closed_by(pool) == {"unanswered": 1}
        assert not channel.closed or reader_tasks()  # still closing, in the pool's nursery
        await wait_until(lambda: channel.closed and not reader_tasks(), within=1)


async def test_a_refused_upgrade_is_a_connect_error_and_a_breaker_failure(
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.mode = "refuse"
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
    relay: Relay, client_context: ssl.SSLContext
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
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    ws_relay.mode = "hold"
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
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    ws_relay.mode = "hold"
    async with sc.open_pool(proxied_url(proxy), ssl_context=client_context) as pool:
        with trio.move_on_after(0.3) as scope:
            async with pool.websocket():
                pytest.fail("no channel was opened")
        assert scope.cancelled_caught
        assert ws_relay.upgrades == 1
        assert books(pool)["opening"] == books(pool)["in_use"] == 0
        await wait_until(lambda: proxy.open_connections == 0)
        ws_relay.mode = "echo"
        async with pool.websocket() as channel:
            assert await call(channel, "after") == "after"


async def test_a_relay_closing_a_lent_channel_is_an_error_counted_once(
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
) -> None:
    lent: list[sc.WebSocketChannel] = []

    async def ask() -> None:
        async with pool.websocket() as channel:
            lent.append(channel)
            await call(channel, "hello")

    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        ws_relay.mode = "close_on_message"
        with pytest.raises(trio.BrokenResourceError, match=r"1011 INTERNAL_ERROR: overloaded"):
            await ask()
        assert lent[0].errors == {"ws_close": 1}
        status = pool.status()
        assert status["errors_by_kind"] == {"ws_close": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        assert closed_by(pool) == {"error": 1}
        ws_relay.mode = "echo"
        async with pool.websocket() as channel:
            assert await call(channel, "again") == "again"
        assert pool.status()["breaker"]["consecutive_failures"] == 0


async def test_a_reset_under_a_lent_channel_is_an_io_error(
    nursery: trio.Nursery, ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    ws_relay.echo_delay = 10

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
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
) -> None:
    ws_relay.echo_delay = 0.2
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        async with pool.websocket() as first:
            await first.send_message("reply comes late")
        async with pool.websocket() as second:
            with trio.move_on_after(0.05):  # gave up waiting: the reply is still coming
                await call(second, "also late")
        assert second is not first
        ws_relay.echo_delay = 0
        async with pool.websocket() as third:
            assert third not in (first, second)
            assert await call(third, "mine") == "mine"
        assert closed_by(pool) == {"unanswered": 2}


async def test_messages_must_be_str_or_bytes(
    ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, connect_timeout=0.5, cleanup_interval=60
    ) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        upkeep = pool._relay._upkeep
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
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy),
        ssl_context=client_context,
        min_idle=1,
        connect_timeout=0.3,
        cleanup_interval=0.2,
        shutdown_timeout=0.2,
    ) as pool:
        await wait_until(lambda: books(pool)["idle"] == 1)
        await trio.sleep(0.5)  # passes come and go: the pongs come back
        assert closed_by(pool) == {}
        proxy.black_hole = True
        await wait_until(lambda: closed_by(pool) == {"stale": 1}, within=2)
        proxy.black_hole = False  # the spare keeper replaces it
        await wait_until(lambda: books(pool)["idle"] == 1 and books(pool)["opened_total"] == 2)


async def test_a_channel_lent_while_its_ping_goes_unanswered_is_not_pooled_again(
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy),
        ssl_context=client_context,
        connect_timeout=0.5,
        cleanup_interval=60,
        shutdown_timeout=0.2,  # its close frame, too, goes into the black hole
    ) as pool:
        async with pool.websocket() as first:
            assert await call(first, "one") == "one"
        proxy.black_hole = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool._relay._upkeep.clean)
            await trio.sleep(0.1)  # the ping is out
            async with pool.websocket() as lent:
                assert lent is first  # nothing told the pool yet
                await wait_until(lambda: not lent.reusable)
        assert closed_by(pool) == {"stale": 1}


async def test_shutdown_sends_close_frames_before_the_tls_close(
    nursery: trio.Nursery, ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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


async def test_shutdown_of_a_black_holed_relay_ends_within_the_deadline(
    ws_relay: WebSocketRelay, proxy: Proxy, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        proxied_url(proxy), ssl_context=client_context, min_idle=2, shutdown_timeout=0.3
    ) as pool:
        await wait_until(lambda: books(pool)["idle"] == 2)
        proxy.black_hole = True  # no close frame will come back
        began = trio.current_time()
    assert trio.current_time() - began == pytest.approx(0.3, abs=0.25)
    assert reader_tasks() == []
    assert not pool.channels()


async def test_a_mixed_pool_routes_each_checkout_to_its_kind(
    relay: Relay, ws_relay: WebSocketRelay, client_context: ssl.SSLContext
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
    relay: Relay, ws_relay: WebSocketRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(ws_relay.url, ssl_context=client_context) as pool:
        with pytest.raises(TypeError, match=r"only WebSocket .* pool\.websocket\(\)"):
            pool.connection()
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with pytest.raises(TypeError, match=r"no WebSocket .* pool\.connection\(\)"):
            pool.websocket()


async def test_websocket_checkouts_fail_over_to_a_relay_that_accepts(
    nursery: trio.Nursery, ws_relay: WebSocketRelay, client_context: ssl.SSLContext
) -> None:
    refusing = WebSocketRelay(make_server_context())
    await nursery.start(refusing.serve)
    refusing.mode = "refuse"
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
