"""The JSON-RPC client (`trio_securechannel.jsonrpc`) against a JSON-RPC relay of our own,
over real TLS (newline-delimited) and ``wss://`` on 127.0.0.1.

tests/test_electrumx.py runs the same client against a real ElectrumX server.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import trio_securechannel as sc
from trio_securechannel.jsonrpc import (
    JsonRpcChannel,
    JsonRpcClient,
    Notification,
    RpcError,
    electrum_handshake,
)

from helpers import books
from jsonrpc_relay import ERROR_CODE, JsonRpcRelay


@pytest.fixture(params=["tls", "wss"])
async def rpc_relay(request: pytest.FixtureRequest, nursery: trio.Nursery) -> JsonRpcRelay:
    """The relay over raw TLS (newline-delimited), then over wss:// (a message per frame)."""
    relay = JsonRpcRelay(electrum_rules=True)
    await nursery.start(relay.serve_tls if request.param == "tls" else relay.serve_wss)
    return relay


@pytest.fixture
async def pool(
    rpc_relay: JsonRpcRelay, client_context: ssl.SSLContext
) -> AsyncIterator[sc.SecureChannelPool]:
    async with sc.open_pool(
        rpc_relay.address,
        ssl_context=client_context,
        setup=electrum_handshake("trio-securechannel tests"),
        max_connections=4,
        acquire_timeout=10,
        request_timeout=5,
    ) as pool:
        yield pool


def closed_by(pool: sc.SecureChannelPool) -> dict[str, int]:
    closed: dict[str, int] = books(pool)["closed_by_reason"]
    return closed


async def test_a_call_returns_its_result(pool: sc.SecureChannelPool) -> None:
    client = JsonRpcClient(pool)
    assert await client.call("echo", 1, "two", [3], {"four": 4}) == [1, "two", [3], {"four": 4}]
    assert await client.call("echo") == []
    assert closed_by(pool) == {}


async def test_concurrent_callers_each_get_their_own_long_reply(
    pool: sc.SecureChannelPool, rpc_relay: JsonRpcRelay
) -> None:
    # Replies of 40 KB, sent in 4 KB pieces: none fits one read, every caller gets its own.
    rpc_relay.chunk = 4096
    client = JsonRpcClient(pool)
    wrong: list[int] = []

    async def caller(task: int) -> None:
        for call in range(5):
            padding = "x" * 40_000
            if await client.call("echo", task, call, padding) != [task, call, padding]:
                wrong.append(task)

    async with trio.open_nursery() as nursery:
        for task in range(20):
            nursery.start_soon(caller, task)
    assert wrong == []
    assert closed_by(pool) == {}  # every channel went back at a message boundary
    assert rpc_relay.hung_up == 0  # each new channel said server.version first


async def test_an_error_reply_is_raised_and_the_relay_keeps_its_standing(
    pool: sc.SecureChannelPool,
) -> None:
    client = JsonRpcClient(pool)
    for _ in range(pool.config.breaker_failure_threshold + 1):
        with pytest.raises(RpcError, match="answered fail with error -32001: it failed") as info:
            await client.call("fail")
    error = info.value
    assert (error.code, error.message, error.data, error.method) == (
        ERROR_CODE,
        "it failed",
        {"why": "asked to"},
        "fail",
    )
    assert error.endpoint in str(error)
    assert pool.breaker_state is sc.BreakerState.CLOSED
    assert pool.status()["errors_by_kind"] == {}
    assert closed_by(pool) == {}
    assert books(pool)["opened_total"] == 1  # the same channel, pooled again each time


@pytest.mark.parametrize(
    ("method", "complaint"),
    [
        ("garbage", "not JSON"),
        ("nested", "not JSON"),
        ("wrong_id", "a reply to request"),
        ("id_true", "a reply to request True"),
        ("null_id_error", "an error for no request in particular.*parse error at the relay"),
        ("neither", "neither a result nor an error"),
    ],
)
async def test_a_reply_that_is_not_json_rpc_is_held_against_the_relay(
    pool: sc.SecureChannelPool, method: str, complaint: str
) -> None:
    client = JsonRpcClient(pool)
    with pytest.raises(sc.ProtocolError, match=complaint):
        await client.call(method)
    assert pool.status()["errors_by_kind"] == {"protocol": 1}
    assert pool.status()["breaker"]["consecutive_failures"] == 1
    assert closed_by(pool) == {"error": 1}  # discarded, not pooled
    assert await client.call("echo", "after") == ["after"]  # on a fresh channel


async def test_an_oversized_reply_is_refused_and_counted_but_opens_no_breaker(
    rpc_relay: JsonRpcRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        rpc_relay.address,
        ssl_context=client_context,
        setup=electrum_handshake("tests"),
        max_line_length=10_000,
        websocket_max_message_size=10_000,
    ) as pool:
        client = JsonRpcClient(pool)
        for _ in range(pool.config.breaker_failure_threshold + 1):
            with pytest.raises(sc.ProtocolError, match=r"max_(line_length|message_size)=10000"):
                await client.call("blob", 20_000)
        assert pool.status()["errors_by_kind"] == {"too_big": 6}
        # The limit is ours: the relay's breaker stays closed for everyone else.
        assert pool.breaker_state is sc.BreakerState.CLOSED
        assert len(await client.call("blob", 9_000)) == 9_000


async def test_a_relay_that_never_answers_times_out_and_is_held_responsible(
    pool: sc.SecureChannelPool,
) -> None:
    client = JsonRpcClient(pool, timeout=0.2)
    began = trio.current_time()
    with pytest.raises(sc.RequestTimeout, match=r"0\.2s"):
        await client.call("sleep", 5)
    assert trio.current_time() - began < 1
    assert pool.status()["errors_by_kind"] == {"timeout": 1}
    assert pool.status()["breaker"]["consecutive_failures"] == 1


async def test_a_callers_own_cancel_scope_aborts_a_call_and_blames_nobody(
    pool: sc.SecureChannelPool,
) -> None:
    client = JsonRpcClient(pool, timeout=math.inf)
    with trio.move_on_after(0.2) as scope:
        await client.call("sleep", 5)
    assert scope.cancelled_caught
    assert pool.status()["errors_by_kind"] == {}
    assert pool.status()["breaker"]["consecutive_failures"] == 0
    assert closed_by(pool) == {"aborted": 1}  # a reply may still come: not pooled
    assert await client.call("echo", 1) == [1]


async def test_params_that_are_not_json_fail_before_a_channel_is_taken(
    pool: sc.SecureChannelPool,
) -> None:
    client = JsonRpcClient(pool)
    with pytest.raises(TypeError, match="the params of echo are not JSON"):
        await client.call("echo", object())
    with pytest.raises(TypeError, match="the params of echo are not JSON"):
        await client.call("echo", math.nan)
    with pytest.raises(TypeError, match="non-empty str"):
        await client.call("")
    assert books(pool)["opened_total"] == 0


async def test_a_batch_returns_outcomes_in_the_order_asked(
    pool: sc.SecureChannelPool, rpc_relay: JsonRpcRelay
) -> None:
    client = JsonRpcClient(pool)
    # The relay answers a batch in reverse order: the client matches replies by id.
    outcomes = await client.batch([("echo", 1), ("fail",), ("blob", 3), ("echo", "last")])
    assert outcomes[0] == [1]
    assert isinstance(outcomes[1], RpcError)
    assert outcomes[1].code == ERROR_CODE
    assert outcomes[2:] == ["xxx", ["last"]]
    assert rpc_relay.batches == 1
    with pytest.raises(ValueError, match="no calls"):
        await client.batch([])
    with pytest.raises(TypeError, match="each call is"):
        await client.batch(["echo"])
    assert closed_by(pool) == {}


async def test_a_subscription_receives_notifications_and_its_channel_is_never_pooled(
    pool: sc.SecureChannelPool, rpc_relay: JsonRpcRelay
) -> None:
    client = JsonRpcClient(pool)
    async with client.subscribe("subscribe") as subscription:
        assert subscription.result == "subscribed"
        assert await rpc_relay.notify("subscribe", {"height": 1}) == 1
        assert await rpc_relay.notify("subscribe", {"height": 2}) == 1
        # A call on the held channel: notifications that come before its reply are kept.
        assert await subscription.call("echo", "meanwhile") == ["meanwhile"]
        received: list[Notification] = []
        async for notification in subscription:
            received.append(notification)
            if len(received) == 2:
                break
        assert received == [
            Notification("subscribe", [{"height": 1}]),
            Notification("subscribe", [{"height": 2}]),
        ]
        assert books(pool)["in_use"] == 1
        assert await client.call("echo", "other") == ["other"]  # on another channel
    assert closed_by(pool) == {"subscribed": 1}
    assert books(pool)["idle"] == 1  # the other one
    assert pool.status()["errors_by_kind"] == {}


@pytest.mark.parametrize(
    "calls",
    [[("echo", 1), ("list_id",)], [("echo", 1), ("garbage",)]],
    ids=["a reply with a list for its id", "garbage inside"],
)
async def test_a_batch_reply_that_is_not_json_rpc_is_held_against_the_relay(
    pool: sc.SecureChannelPool, calls: list[tuple[Any, ...]]
) -> None:
    with pytest.raises(sc.ProtocolError):
        await JsonRpcClient(pool).batch(calls)
    assert pool.status()["errors_by_kind"] == {"protocol": 1}
    assert pool.status()["breaker"]["consecutive_failures"] == 1


async def test_a_second_task_on_a_subscription_is_refused_before_it_sends(
    pool: sc.SecureChannelPool, rpc_relay: JsonRpcRelay
) -> None:
    # One task iterates while another calls: the call's reply would reach the iterator as
    # a reply nobody asked for, and an innocent relay would be blamed.
    client = JsonRpcClient(pool)
    async with client.subscribe("subscribe") as subscription, trio.open_nursery() as nursery:
        received: list[Notification] = []

        async def listen() -> None:
            received.append(await subscription.next_notification())

        nursery.start_soon(listen)
        await trio.testing.wait_all_tasks_blocked()
        echoes = rpc_relay.calls["echo"]
        with pytest.raises(trio.BusyResourceError, match="one at a time"):
            await subscription.call("echo", "meanwhile")
        assert rpc_relay.calls["echo"] == echoes  # refused before anything was sent
        await rpc_relay.notify("subscribe", "news")
    assert received == [Notification("subscribe", ["news"])]
    assert pool.status()["errors_by_kind"] == {}


async def test_a_held_channels_own_deadline_stands_through_calls_with_a_longer_limit(
    pool: sc.SecureChannelPool,
) -> None:
    checkout = pool.websocket if pool.endpoints[0].is_websocket else pool.connection
    async with checkout(timeout=0.3) as channel:
        deadline = channel.deadline
        rpc = JsonRpcChannel(channel, time_limit=30)
        assert await rpc.call("echo", 1) == [1]
        assert (channel.deadline, channel.request_timeout) == (deadline, 0.3)
        began = trio.current_time()
        with pytest.raises(sc.RequestTimeout, match=r"0\.3s"):
            await rpc.call("sleep", 5)  # the lease's 0.3 s, not the channel's 30 s
        assert trio.current_time() - began < 1


async def test_a_subscription_waits_for_notifications_beyond_the_request_timeout(
    pool: sc.SecureChannelPool, rpc_relay: JsonRpcRelay
) -> None:
    client = JsonRpcClient(pool, timeout=0.2)
    async with client.subscribe("subscribe") as subscription:
        await trio.sleep(0.4)  # longer than a call may take: a subscription may be quiet
        await rpc_relay.notify("subscribe", "late")
        assert await subscription.next_notification() == Notification("subscribe", ["late"])
        with pytest.raises(sc.RequestTimeout):
            await subscription.call("sleep", 5)  # a call on it still has the time limit
    assert pool.status()["errors_by_kind"] == {"timeout": 1}


async def test_json_rpc_on_a_channel_held_in_setup_or_a_block(
    pool: sc.SecureChannelPool,
) -> None:
    checkout = pool.websocket if pool.endpoints[0].is_websocket else pool.connection
    async with checkout() as channel:
        rpc = JsonRpcChannel(channel)
        assert await rpc.call("echo", 7) == [7]
        with pytest.raises(RpcError):
            await rpc.call("fail")
    assert closed_by(pool) == {}
    with pytest.raises(TypeError, match="a pool's channel"):
        JsonRpcChannel(object())  # type: ignore[arg-type]


async def test_electrum_handshake_refused_is_a_failure_to_connect(
    rpc_relay: JsonRpcRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(
        rpc_relay.address, ssl_context=client_context, setup=electrum_handshake("tests", "0.1")
    ) as pool:
        with pytest.raises(sc.ConnectError, match="unsupported protocol version") as info:
            await JsonRpcClient(pool).call("echo")
        assert info.value.phase == "setup"
        assert isinstance(info.value.__cause__, RpcError)
        assert pool.status()["breaker"]["consecutive_failures"] == 1


async def test_the_client_checks_what_it_is_given(pool: sc.SecureChannelPool) -> None:
    with pytest.raises(TypeError, match="needs a SecureChannelPool"):
        JsonRpcClient("relay:443")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        JsonRpcClient(pool, timeout=0)
    with pytest.raises(ValueError, match="client_name"):
        electrum_handshake("")
    assert "JsonRpcClient" in repr(JsonRpcClient(pool))
