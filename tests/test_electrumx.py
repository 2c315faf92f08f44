"""The pool and its JSON-RPC client against a real Electrum server: ElectrumX on Bitcoin
regtest (over a stub bitcoind, tests/electrumx_daemon.py), over TLS and ``wss://``.

Nobody here wrote ElectrumX: its session rules (``server.version`` first, or it hangs up),
its padding and batching of messages, and its subscriptions are the real thing.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import trio_securechannel as sc
from trio_securechannel.jsonrpc import JsonRpcClient, RpcError, electrum_handshake

from electrumx_daemon import Block
from electrumx_runner import ElectrumX, requires_electrumx, run_electrumx

pytestmark = requires_electrumx

HELLO = electrum_handshake("trio-securechannel tests", ("1.4", "1.4.2"))


@pytest.fixture
async def electrumx(tmp_path: Path) -> AsyncIterator[ElectrumX]:
    async with run_electrumx(tmp_path, blocks=20) as server:
        yield server


@pytest.fixture(params=["tls", "wss"])
def over(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def address(server: ElectrumX, over: str) -> str:
    return server.wss_url if over == "wss" else server.ssl_target


async def test_without_setup_electrumx_refuses_the_session(electrumx: ElectrumX) -> None:
    # Why `setup` exists: a session's first message must be server.version.
    async with sc.open_pool(electrumx.ssl_target, ssl_context=electrumx.client_context()) as pool:
        with pytest.raises(RpcError, match=r"server\.version"):
            await JsonRpcClient(pool).call("server.features")


async def test_setup_negotiates_every_channel_so_concurrent_calls_succeed(
    electrumx: ElectrumX, over: str
) -> None:
    # The project's old example worked only while one channel did all the calls.
    async with sc.open_pool(
        address(electrumx, over), ssl_context=electrumx.client_context(), setup=HELLO
    ) as pool:
        client = JsonRpcClient(pool)
        features, header = await both(
            client.call("server.features"), client.call("blockchain.block.header", 7)
        )
        assert features["genesis_hash"] == header_of(electrumx, 0).hash
        assert header == header_hex(electrumx, 7)
        assert pool.status()["connections"]["opened_total"] == 2


async def test_fifty_tasks_share_eight_channels_and_each_gets_its_own_header(
    electrumx: ElectrumX, over: str
) -> None:
    chain = electrumx.daemon.chain
    wrong: list[int] = []
    async with sc.open_pool(
        address(electrumx, over),
        ssl_context=electrumx.client_context(),
        setup=HELLO,
        max_connections=8,
        acquire_timeout=30,
        request_timeout=10,
    ) as pool:
        client = JsonRpcClient(pool)

        async def task(number: int) -> None:
            # (One call each: over raw TLS, ElectrumX holds small replies back for up to
            # a second once a session has been sent 1 KiB, to batch them.)
            height = number % (chain.height + 1)
            if await client.call("blockchain.block.header", height) != header_hex(
                electrumx, height
            ):
                wrong.append(height)

        async with trio.open_nursery() as nursery:
            for number in range(50):
                nursery.start_soon(task, number)
        assert wrong == []
        status = pool.status()
        assert status["connections"]["opened_total"] <= 8
        assert status["connections"]["closed_by_reason"] == {}
        assert status["errors_by_kind"] == {}


async def test_an_error_reply_is_raised_and_the_channel_kept(
    electrumx: ElectrumX, over: str
) -> None:
    async with sc.open_pool(
        address(electrumx, over), ssl_context=electrumx.client_context(), setup=HELLO
    ) as pool:
        client = JsonRpcClient(pool)
        with pytest.raises(RpcError, match="height") as info:
            await client.call("blockchain.block.header", 10**6)
        assert isinstance(info.value.code, int)
        with pytest.raises(RpcError) as unknown:
            await client.call("no.such.method")
        assert "no.such.method" in unknown.value.message
        assert await client.call("server.ping") is None
        status = pool.status()
        assert status["connections"]["opened_total"] == 1  # the same channel throughout
        assert status["breaker"]["consecutive_failures"] == 0


async def test_a_batch_of_headers(electrumx: ElectrumX, over: str) -> None:
    async with sc.open_pool(
        address(electrumx, over), ssl_context=electrumx.client_context(), setup=HELLO
    ) as pool:
        outcomes = await JsonRpcClient(pool).batch(
            [("blockchain.block.header", height) for height in range(10)]
            + [("blockchain.block.header", 10**6)]
        )
        assert outcomes[:10] == [header_hex(electrumx, height) for height in range(10)]
        assert isinstance(outcomes[10], RpcError)


async def test_a_header_subscription_receives_new_blocks(electrumx: ElectrumX, over: str) -> None:
    async with sc.open_pool(
        address(electrumx, over), ssl_context=electrumx.client_context(), setup=HELLO
    ) as pool:
        client = JsonRpcClient(pool, timeout=10)
        async with client.subscribe("blockchain.headers.subscribe") as headers:
            assert headers.result["height"] == electrumx.height
            for _ in range(2):
                (block,) = electrumx.mine()
                with trio.fail_after(10):
                    notification = await headers.next_notification()
                assert notification.method == "blockchain.headers.subscribe"
                assert notification.params == [{"height": block.height, "hex": block.header.hex()}]
            # Calls still work on the held channel, and on the pool's others.
            assert await headers.call("server.ping") is None
            assert await client.call("blockchain.block.header", block.height) == block.header.hex()
        assert pool.status()["connections"]["closed_by_reason"] == {"subscribed": 1}


async def test_a_pinned_self_signed_electrumx_connects_and_a_wrong_pin_is_refused(
    tmp_path: Path,
) -> None:
    # Its certificate comes from a CA nobody trusts, as a self-signed Electrum server's
    # would: only its pin vouches for it.
    async with run_electrumx(tmp_path, blocks=3, ca=trustme.CA()) as server:
        pin = sc.public_key_pin((server.directory / "cert.pem").read_text())
        trusting_nothing = ssl.create_default_context()  # system roots: not this CA
        async with sc.open_pool(
            server.ssl_target, ssl_context=trusting_nothing, setup=HELLO
        ) as pool:
            with pytest.raises(sc.ConnectError) as unpinned:
                await JsonRpcClient(pool).call("server.ping")
            assert unpinned.value.phase == "tls"
        async with sc.open_pool(
            server.ssl_target, setup=HELLO, pins={server.ssl_target: pin}
        ) as pool:
            assert await JsonRpcClient(pool).call("blockchain.block.header", 3) == (
                server.tip.header.hex()
            )
        other_key = sc.public_key_pin(
            trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].bytes().decode()
        )
        async with sc.open_pool(
            server.ssl_target, setup=HELLO, pins={server.ssl_target: other_key}
        ) as pool:
            with pytest.raises(sc.ConnectError, match=pin.replace("+", r"\+")) as mismatch:
                await JsonRpcClient(pool).call("server.ping")
            assert mismatch.value.phase == "pin"


def header_of(server: ElectrumX, height: int) -> Block:
    block = server.daemon.chain.at(height)
    assert block is not None
    return block


def header_hex(server: ElectrumX, height: int) -> str:
    """The header ElectrumX must serve at ``height``: the stub daemon's, in hex."""
    return header_of(server, height).header.hex()


async def both(first: Any, second: Any) -> tuple[Any, Any]:
    """Run two calls at once; their results."""
    results: dict[int, Any] = {}

    async def run(index: int, call: Any) -> None:
        results[index] = await call

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, first)
        nursery.start_soon(run, 1, second)
    return results[0], results[1]
