"""`SecureChannel` keeps the `trio.abc.Stream` contract (and FAULTS.md row 18)."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

import trio_securechannel as sc
from trio_securechannel import Endpoint, SecureChannel
from trio_securechannel.testing import LoopbackRelay

from conftest import make_server_context

ENDPOINT = Endpoint("127.0.0.1", 443)


async def _handshake(
    client: trio.SSLStream[trio.abc.Stream], server: trio.SSLStream[trio.abc.Stream]
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


def _tls_pair(
    client_context: ssl.SSLContext, transports: tuple[trio.abc.Stream, trio.abc.Stream]
) -> tuple[trio.SSLStream[trio.abc.Stream], trio.SSLStream[trio.abc.Stream]]:
    client_transport, server_transport = transports
    client = trio.SSLStream(client_transport, client_context, server_hostname="127.0.0.1")
    server = trio.SSLStream(server_transport, make_server_context(), server_side=True)
    return client, server


async def test_conforms_to_trio_stream_contract(client_context: ssl.SSLContext) -> None:
    async def stream_maker() -> tuple[SecureChannel, trio.SSLStream[trio.abc.Stream]]:
        client, server = _tls_pair(client_context, trio.testing.memory_stream_pair())
        return SecureChannel(client, ENDPOINT), server

    async def clogged_stream_maker() -> tuple[SecureChannel, trio.SSLStream[trio.abc.Stream]]:
        client, server = _tls_pair(client_context, trio.testing.lockstep_stream_pair())
        await _handshake(client, server)  # as trio's own SSLStream test does
        return SecureChannel(client, ENDPOINT), server

    await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


async def test_errors_after_close_and_concurrent_use(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await channel.receive_some()
                await channel.send_all(b"x")  # lets the first receiver finish
            assert channel.reusable  # misuse by a second task left the stream intact
            await channel.aclose()
            await channel.aclose()  # idempotent
            assert channel.closed
            with pytest.raises(trio.ClosedResourceError):
                await channel.send_all(b"after close")
            with pytest.raises(trio.ClosedResourceError):
                await channel.receive_some()
        # Closed by its user: not given back, and not counted as an error.
        assert pool.status()["connections"]["closed_by_reason"] == {"closed": 1}
        assert pool.status()["errors_total"] == 0


async def test_counts_bytes(relay: LoopbackRelay, client_context: ssl.SSLContext) -> None:
    async with (
        sc.open_pool(relay.target, ssl_context=client_context) as pool,
        pool.connection() as channel,
    ):
        await channel.send_all(b"12345")
        received = b""
        while len(received) < 5:
            received += await channel.receive_some()
        assert (channel.bytes_sent, channel.bytes_received) == (5, 5)
        assert repr(channel).startswith(f"<SecureChannel #{channel.id} to 127.0.0.1:")


async def test_garbage_collected_unclosed_channel_warns(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    stream = trio.SSLStream(
        await trio.open_tcp_stream(*relay.target), client_context, server_hostname="127.0.0.1"
    )
    await stream.do_handshake()
    transport = stream.transport_stream
    assert isinstance(transport, trio.SocketStream)
    transport.socket.close()  # the socket itself is closed, so only the channel can warn
    with pytest.warns(ResourceWarning, match=r"unclosed <SecureChannel #\d+ to 127\.0\.0\.1:"):
        SecureChannel(stream, Endpoint(*relay.target))  # dropped at once, never closed
