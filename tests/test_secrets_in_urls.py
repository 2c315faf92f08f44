"""Row 36: a secret in a ``wss://`` URL's query reaches the relay, and nothing else.

A relay URL such as ``wss://relay.example/ws?apikey=...`` carries a credential. The upgrade
request must still ask for the real resource; everywhere the pool names the relay
(`status()`, the ``endpoint`` metric label, reprs, logs, errors) the query is ``?...``.
"""

from __future__ import annotations

import json
import logging
import ssl

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel import Endpoint
from trio_securechannel.testing import LoopbackRelay

from conftest import new_relay
from helpers import closed_port
from http_client import request

SECRET = "sk_live_5ecr3tK3y"


@pytest.fixture
async def ws_relay(nursery: trio.Nursery) -> LoopbackRelay:
    relay = new_relay(websocket=True, path="/ws")
    await nursery.start(relay.serve)
    return relay


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert SECRET not in str(text)
        assert SECRET not in repr(text)


async def test_the_relay_gets_the_query_and_nothing_else_shows_it(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # ours, trio-websocket's: every record
    url = f"{ws_relay.url}?apikey={SECRET}&v=2"
    async with sc.open_pool(url, ssl_context=client_context, metrics_port=0) as pool:
        async with pool.websocket() as channel:
            await channel.send_message("ping")
            assert await channel.get_message() == "ping"
            shown_channel = repr(channel)
        status = json.dumps(pool.status())
        metrics = pool.metrics_text().decode()
        assert_no_secret(status, metrics, pool, pool.endpoint, shown_channel)
        # Still named, host, port and path, so the relay can be told apart.
        assert pool.status()["target"] == f"{ws_relay.url}?..."
        assert f'endpoint="{ws_relay.url}?..."' in metrics
        # /status and /metrics as a monitoring system sees them.
        address = pool.metrics_address
        assert address is not None
        for path in ("/status", "/metrics"):
            served = await request(address, path)
            assert served.status == 200
            assert f"{ws_relay.url}?...".encode() in served.body
            assert_no_secret(served.body.decode())
    assert ws_relay.request_paths == [f"/ws?apikey={SECRET}&v=2"]  # the real one, as given
    assert caplog.records  # something was logged, and none of it the secret
    assert_no_secret(caplog.text)


async def test_connect_errors_and_the_breaker_do_not_show_the_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"wss://127.0.0.1:{closed_port()}/ws?apikey={SECRET}"
    async with sc.open_pool(url, breaker_failure_threshold=1, breaker_cooldown=60) as pool:
        with pytest.raises(sc.ConnectError) as refused:
            async with pool.websocket():
                pass  # pragma: no cover
        assert refused.value.phase == "tcp"
        with pytest.raises(sc.CircuitOpen) as open_breaker:
            async with pool.websocket():
                pass  # pragma: no cover
        assert_no_secret(
            refused.value,
            refused.value.endpoint,
            open_breaker.value,
            open_breaker.value.endpoint,
            json.dumps(pool.status()),
            pool.metrics_text().decode(),
        )
        assert "wss://127.0.0.1:" in str(refused.value)  # the relay is still named
    assert_no_secret(caplog.text)


async def test_pool_exhausted_does_not_show_the_query(
    ws_relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    url = f"{ws_relay.url}?apikey={SECRET}"
    opening = sc.open_pool(url, ssl_context=client_context, max_connections=1)
    async with opening as pool, pool.websocket():  # the only channel, in use
        with pytest.raises(sc.PoolExhausted) as exhausted:
            async with pool.websocket():
                pass  # pragma: no cover
    assert_no_secret(exhausted.value, exhausted.value.endpoint)
    assert f"{ws_relay.url}?..." in str(exhausted.value)


def test_endpoint_str_and_repr_hide_the_query_but_keep_it_for_the_upgrade() -> None:
    endpoint = Endpoint.parse(f"wss://relay.example/v1/feed?apikey={SECRET}")
    assert str(endpoint) == "wss://relay.example:443/v1/feed?..."
    assert repr(endpoint) == (
        "Endpoint(host='relay.example', port=443, websocket_path='/v1/feed?...')"
    )
    assert endpoint.websocket_path == f"/v1/feed?apikey={SECRET}"
    plain = Endpoint.parse("wss://relay.example/ws")
    assert (str(plain), plain.websocket_path) == ("wss://relay.example:443/ws", "/ws")


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (f"wss://relay.example:99999/ws?apikey={SECRET}", "invalid port"),
        (f"wss://relay.example:0/ws?apikey={SECRET}", "out of range"),
        (f"wss://user:{SECRET}@relay.example/ws", "credentials"),
        (f"wss://relay.example/ws?apikey={SECRET}#top", "no fragment"),
        (f"wss://relay.example/ws?apikey={SECRET}\n", "control character"),
        (f"wss://relay.example/bücher?apikey={SECRET}", "non-ASCII path"),
        (f"wss://[relay]/ws?apikey={SECRET}", "malformed URL"),
        (f"https://relay.example/ws?apikey={SECRET}", "unsupported scheme"),
        (f"tls://relay.example:443?apikey={SECRET}", "port must be a number"),
        (f"tls://user:{SECRET}@relay.example:443", "[addr]:port"),
    ],
)
def test_bad_urls_are_refused_without_echoing_the_secret(target: str, words: str) -> None:
    with pytest.raises(ValueError, match=r"^target: ") as info:
        sc.open_pool(target)
    assert words in str(info.value)
    assert_no_secret(info.value)
    with pytest.raises(ValueError, match=r"^target\[1\]: ") as info:
        sc.open_pool(["relay.example:443", target])
    assert_no_secret(info.value)


def test_relays_that_differ_only_in_their_query_are_refused_rather_than_share_a_name() -> None:
    # Their names hide the query: /metrics and status() could not tell them apart.
    with pytest.raises(ValueError, match="differ only in their query") as info:
        sc.open_pool(["wss://relay.test/ws?key=SECRET1", "wss://relay.test/ws?key=SECRET2"])
    assert "SECRET" not in str(info.value)
