"""Opening a channel: which failures are failures to connect (a `ConnectError`, fed to the
relay's circuit breaker) and which are bugs, which come out as themselves and blame no relay.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import LoopbackRelay

from helpers import books, echo

Opener = Callable[[str, int], Awaitable[Any]]


def returning_a_non_stream(relay: LoopbackRelay) -> Opener:
    async def open_transport(host: str, port: int) -> Any:
        await trio.lowlevel.checkpoint()
        return ("not", "a", "stream")  # say, a (stream, address) pair from a proxy library

    return open_transport


def with_a_bug(relay: LoopbackRelay) -> Opener:
    async def open_transport(host: str, port: int) -> Any:
        stream: Any = await relay.open_memory_stream(host, port)
        return stream.socket  # a memory stream has no .socket: AttributeError

    return open_transport


@pytest.mark.parametrize(
    ("broken_transport", "error", "words"),
    [
        (returning_a_non_stream, TypeError, "open_transport must return a trio.abc.Stream"),
        (with_a_bug, AttributeError, "socket"),
    ],
    ids=["returns a non-stream", "raises AttributeError"],
)
async def test_a_bug_in_open_transport_comes_out_as_itself_and_blames_no_relay(
    memory_relay: LoopbackRelay,
    client_context: ssl.SSLContext,
    broken_transport: Callable[[LoopbackRelay], Opener],
    error: type[Exception],
    words: str,
) -> None:
    transport: Opener = broken_transport(memory_relay)

    async def open_transport(host: str, port: int) -> trio.abc.Stream:
        opened: trio.abc.Stream = await transport(host, port)
        return opened

    # One slot, and a breaker that opens at the first failure: a bug counted as a relay's
    # failure, or a slot it leaked, would turn the checkout after it away.
    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=open_transport,
        max_connections=1,
        breaker_failure_threshold=1,
    ) as pool:
        for _ in range(2):
            with pytest.raises(error, match=words) as info:
                async with pool.connection():
                    pytest.fail("no channel was opened")
            assert type(info.value) is error  # bare: no ConnectError, no ExceptionGroup
        status = pool.status()
        assert status["breaker"]["state"] == "closed"
        assert status["breaker"]["consecutive_failures"] == 0
        assert status["errors_total"] == 0
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        transport = memory_relay.open_memory_stream  # the bug fixed: the same pool connects
        async with pool.connection() as channel:
            assert await echo(channel, b"after") == b"after"
        assert memory_relay.handshakes == 1


async def test_a_name_the_resolver_cannot_encode_is_a_connect_error(
    client_context: ssl.SSLContext,
) -> None:
    # Python's IDNA 2003 codec (open_pool's check) takes it; trio's resolver encodes names
    # with IDNA 2008, which does not: a UnicodeError before any lookup.
    async with sc.open_pool("\N{SNOWMAN}.test:443", ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pytest.fail("no channel was opened")
        assert info.value.phase == "tcp"
        assert isinstance(info.value.__cause__, UnicodeError)
        status = pool.status()
        assert status["errors_by_kind"] == {"tcp": 1}
        assert status["breaker"]["consecutive_failures"] == 1
        assert books(pool)["in_use"] == books(pool)["opening"] == 0


async def test_a_proxy_that_resets_is_a_failure_to_connect(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    # An open_transport through an HTTP CONNECT proxy: a proxy that resets the connection
    # reaches it as trio.BrokenResourceError, a transport error like any other. The
    # caller gets a ConnectError and the relay's breaker counts it.
    async def resetting_proxy(stream: trio.SocketStream) -> None:
        await stream.receive_some()  # the CONNECT request
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()  # a TCP RST

    listeners = await nursery.start(trio.serve_tcp, resetting_proxy, 0)
    proxy_port = listeners[0].socket.getsockname()[1]

    async def via_proxy(host: str, port: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        try:
            await stream.send_all(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some()
                if not chunk:
                    raise ConnectionError("the proxy hung up")
                answer += chunk
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async with sc.open_pool(
        "relay.test:443",
        ssl_context=client_context,
        open_transport=via_proxy,
        breaker_failure_threshold=1,
    ) as pool:
        with pytest.raises(sc.ConnectError, match=r"relay\.test:443") as info:
            async with pool.connection():
                pass
        assert isinstance(info.value.__cause__, trio.BrokenResourceError)
        assert pool.status()["errors_by_kind"] == {"tcp": 1}
        assert pool.breaker_state is sc.BreakerState.OPEN
