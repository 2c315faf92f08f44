"""The examples do what their docstrings say, against local stand-ins."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import open_relay

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


async def test_electrum_client_calls_and_follows_new_blocks() -> None:
    import electrum_client
    from electrum_standin import TIP_HEIGHT

    results = await electrum_client.main(server=None)
    assert results["features"]["server_version"] == "ElectrumX stand-in 1.16.0"
    assert results["ping"] is None
    assert results["status"]["opened_total"] >= 2  # two calls at once: two sessions
    assert results["tip"]["height"] == TIP_HEIGHT
    assert results["next"]["height"] == TIP_HEIGHT + 1  # pushed on the held channel
    assert results["status"]["in_use"] == 0


async def test_electrum_standin_requires_server_version_first() -> None:
    from electrum_standin import electrum_standin

    async with (
        open_relay(electrum_standin) as relay,
        sc.open_pool(relay.address, ssl_context=relay.client_context()) as pool,
        pool.connection() as channel,
    ):
        await channel.send_line(b'{"jsonrpc": "2.0", "id": 1, "method": "server.ping"}')
        with pytest.raises(trio.BrokenResourceError, match="closed the connection"):
            await channel.receive_line()  # closed: not a word before server.version
    assert relay.endings == {"handler_returned": 1}


async def test_failover_follows_the_breaker_there_and_back() -> None:
    import breaker_failover

    log = await breaker_failover.main()
    transitions = [line for line in log if line.startswith("primary breaker:")]
    assert transitions[0].startswith("primary breaker: closed -> open")
    assert transitions[-1] == "primary breaker: half_open -> closed (trial succeeded)"
    served = log[-1]
    assert served.startswith("served by: primary x")
    assert ", backup x" in served  # traffic moved while the primary was down...
    assert served.rsplit(", ", 1)[-1].startswith("primary x")  # ...and came back


def test_prometheus_config_uses_bearer_credentials() -> None:
    text = (EXAMPLES / "prometheus.yml").read_text()
    assert "type: Bearer" in text
    assert "credentials_file:" in text
    assert "metrics_path: /metrics" in text


async def test_websocket_feed_calls_and_follows_blocks_on_a_held_channel() -> None:
    import websocket_feed

    results = await websocket_feed.main(url=None)
    tip = websocket_feed.TIP_HEIGHT
    assert results["tip"] == results["tip_again"] == {"height": tip}
    assert results["blocks"] == [{"height": tip + 1}, {"height": tip + 2}]
    # The subscribed channel is never lent again (the relay may push more): the last call
    # ran on a new one.
    assert results["status"]["in_use"] == 0
    assert results["status"]["closed_by_reason"] == {"subscribed": 1}
    assert results["status"]["opened_total"] == 2
