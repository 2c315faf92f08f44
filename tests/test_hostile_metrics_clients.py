"""Metrics clients that misbehave on purpose, over real loopback sockets: FAULTS.md rows 34
(a client that never reads) and 35 (many connections), and ``/events`` clients that stop
answering pings.

What the server holds is read from the kernel, not from the server: `held_by_server` counts
this process's connected sockets whose local end is the metrics port (the tests' own
clients live in this process too, but their local ends are other ports).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

import trio_securechannel as sc
import trio_securechannel._server as server_module
from trio_securechannel.testing import LoopbackRelay

from helpers import wait_until
from http_client import request

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/dev/fd"), reason="counts the server's sockets through /dev/fd"
)

#: Asked of the kernel for a client that never reads (it doubles it, and rounds it up).
SMALL_RECEIVE_BUFFER = 4096
UPGRADE = (
    b"GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
#: One event of half a megabyte: a few of them fill any pair of socket buffers.
BIG_EVENT: dict[str, Any] = {"type": "padding", "pad": "x" * 500_000}


@asynccontextmanager
async def metrics_pool(
    relay: LoopbackRelay, context: ssl.SSLContext, **options: Any
) -> AsyncIterator[tuple[sc.SecureChannelPool, tuple[str, int]]]:
    async with sc.open_pool(relay.target, ssl_context=context, metrics_port=0, **options) as pool:
        assert pool.metrics_address is not None
        yield pool, pool.metrics_address


def held_by_server(port: int) -> int:
    """Connections this process holds open on local port ``port`` (the listener aside)."""
    held = 0
    for name in os.listdir("/dev/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except OSError:
            continue  # not a socket, or the directory's own descriptor, gone already
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] == port:
                sock.getpeername()  # the listener has no peer: OSError
                held += 1
        except OSError:
            pass
        finally:
            sock.detach()  # borrowed: never closed here
    return held


async def connect(
    address: tuple[str, int], *, receive_buffer: int | None = None
) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # before connecting, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(address)
    return sock


async def upgrade(
    address: tuple[str, int], *, receive_buffer: int | None = None
) -> trio.socket.SocketType:
    """A WebSocket on ``/events`` that read its ``101`` and will never read again."""
    sock = await connect(address, receive_buffer=receive_buffer)
    await sock.send(UPGRADE)
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            head += await sock.recv(1)  # byte by byte: nothing past the response is read
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


async def pipeline_scrapes_forever(sock: trio.socket.SocketType) -> None:
    """Keep-alive ``GET /metrics`` after ``GET /metrics``, never reading a response."""
    with suppress(OSError, trio.ClosedResourceError):
        while True:
            await sock.send(SCRAPE * 100)


async def sees_closed(sock: trio.socket.SocketType) -> bool:
    """Read until the server's FIN or RST: True once it closed the connection."""
    with trio.move_on_after(5):
        try:
            while await sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        return True
    return False


async def turned_away(address: tuple[str, int]) -> bool:
    """Ask for ``/healthz``: True if the server closes without a word (FIN or RST)."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        with suppress(trio.BrokenResourceError):
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:  # reset: it had not read our request
            return True


async def close_at(deadline: float, socks: list[trio.socket.SocketType]) -> None:
    """Free a server stuck on these clients (a hang would stall the whole run)."""
    await trio.sleep_until(deadline)
    for sock in socks:
        sock.close()


# Row 34 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["pipelined-scrapes", "events"])
async def test_leaving_open_pool_is_bounded_while_a_client_never_reads(
    relay: LoopbackRelay, client_context: ssl.SSLContext, client: str
) -> None:
    shutdown_timeout = 1.0
    stuck: list[trio.socket.SocketType] = []
    async with trio.open_nursery() as nursery:
        async with metrics_pool(relay, client_context, shutdown_timeout=shutdown_timeout) as (
            pool,
            address,
        ):
            if client == "pipelined-scrapes":
                sock = await connect(address, receive_buffer=SMALL_RECEIVE_BUFFER)
                nursery.start_soon(pipeline_scrapes_forever, sock)
            else:
                sock = await upgrade(address, receive_buffer=SMALL_RECEIVE_BUFFER)
                for _ in range(40):  # 20 MB of events it never reads
                    pool._events.publish(BIG_EVENT)
                    await trio.sleep(0.01)
            stuck.append(sock)
            await trio.sleep(1)  # the server's writes to it are blocked by now
            assert held_by_server(address[1]) == 1
            left_at = trio.current_time()
            nursery.start_soon(close_at, left_at + shutdown_timeout + 3, stuck)
        took = trio.current_time() - left_at
        nursery.cancel_scope.cancel()
    try:
        assert took < shutdown_timeout + 0.5, f"leaving open_pool took {took:.1f} s"
        for sock in stuck:
            assert await sees_closed(sock)
    finally:
        for sock in stuck:
            sock.close()


# Row 35 ------------------------------------------------------------------------------------


async def test_idle_connections_are_capped_and_a_scrape_still_gets_in(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    cap = 8
    async with metrics_pool(relay, client_context, metrics_max_connections=cap) as (_, address):
        port = address[1]
        idle: list[trio.SocketStream] = []
        try:
            for _ in range(50):
                idle.append(await trio.open_tcp_stream(*address))
            with trio.move_on_after(2):  # well before the 5 s keep-alive timeout
                while held_by_server(port) > cap:  # noqa: ASYNC110 - kernel state, no event
                    await trio.sleep(0.01)
            assert held_by_server(port) <= cap
            dropped = 0
            for stream in idle:
                with trio.move_on_after(0.05):
                    assert await stream.receive_some() == b""  # closed, nothing said
                    dropped += 1
            assert dropped >= 50 - cap  # the oldest went first
            response = await request(address, "/metrics")  # idle ones make room for it
            assert response.status == 200
            assert b"securechannel_" in response.body
            assert held_by_server(port) <= cap
        finally:
            for stream in idle:
                await stream.aclose()


async def test_when_every_connection_is_busy_a_new_one_is_refused_at_once(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with (
        metrics_pool(relay, client_context, metrics_max_connections=2) as (_, address),
        open_websocket_url(f"ws://{address[0]}:{address[1]}/events") as first,
        open_websocket_url(f"ws://{address[0]}:{address[1]}/events") as second,
    ):
        for ws in (first, second):
            assert json.loads(await ws.get_message())["type"] == "status"
        with trio.fail_after(1):  # refused at once, not queued until some timeout
            assert await turned_away(address)
        assert held_by_server(address[1]) == 2


async def test_an_http2_client_cannot_hold_a_slot(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # HTTP/2's flow control could keep a connection busy for ever, writing nothing and
    # answering pings: the port speaks HTTP/1.1 only, and resets an HTTP/2 preface.
    import h2.connection

    async with metrics_pool(relay, client_context, metrics_max_connections=1) as (_, address):
        http2 = h2.connection.H2Connection()
        http2.initiate_connection()
        http2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        http2.send_headers(
            1, [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
                (":authority", "x")], end_stream=True,
        )  # fmt: skip
        holder = await trio.open_tcp_stream(*address)
        await holder.send_all(http2.data_to_send())
        with trio.fail_after(2):
            with suppress(trio.BrokenResourceError):
                while await holder.receive_some():
                    pass  # (whatever came before the reset)
        await holder.aclose()
        response = await request(address, "/metrics")  # its slot is free again
        assert response.status == 200


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), (8.0, TypeError)]
)
def test_the_cap_is_a_positive_int(value: object, error: type[Exception]) -> None:
    assert sc.PoolConfig().metrics_max_connections == 64
    with pytest.raises(error, match="metrics_max_connections"):
        sc.PoolConfig(metrics_max_connections=value)  # type: ignore[arg-type]


RELAY_TRAFFIC_UNDER_A_LOW_FD_LIMIT = textwrap.dedent(
    """
    import os, resource, sys
    import trio
    import trio_securechannel as sc

    target, ca_file = sys.argv[1], sys.argv[2]

    async def main():
        context = sc.load_root_store(ca_file)
        async with sc.open_pool(
            target, ssl_context=context, metrics_port=0, max_connections=10,
            metrics_max_connections=8,
        ) as pool:
            # Room for the pool's 10 channels and the cap, and a little more: no more.
            in_use = len(os.listdir("/dev/fd"))
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 10 + 8 + 6, hard))
            print(pool.metrics_address[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the port is flooded now
            held = []
            errors = []

            async def check_out():
                try:
                    async with pool.connection() as channel:
                        await channel.send_all(b"ping")
                        assert await channel.receive_some() == b"ping"
                        held.append(channel)
                        await trio.sleep(0.5)  # all ten open at once
                except Exception as exc:
                    errors.append(repr(exc))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(check_out)
            print(f"{len(held)} {errors!r}", flush=True)

    trio.run(main)
    """
)


async def test_relay_traffic_never_starves_for_file_descriptors(
    relay: LoopbackRelay, ca_file: Path
) -> None:
    if not hasattr(os, "fork"):  # (resource is POSIX-only)
        pytest.skip("needs RLIMIT_NOFILE")
    target = f"127.0.0.1:{relay.port}"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", RELAY_TRAFFIC_UNDER_A_LOW_FD_LIMIT, target, str(ca_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    flood: list[trio.SocketStream] = []
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        lines = _Lines(process.stdout)
        with trio.fail_after(20):
            port = int(await lines.next())
            for _ in range(80):  # far more than the child has descriptors to spare
                flood.append(await trio.open_tcp_stream("127.0.0.1", port))
            await trio.sleep(0.5)  # all accepted (or turned away) by now
            async with trio.open_nursery() as nursery:

                async def hammer() -> None:  # and more while the child checks channels out
                    while len(flood) < 300:
                        flood.append(await trio.open_tcp_stream("127.0.0.1", port))
                        await trio.sleep(0.002)

                nursery.start_soon(hammer)
                await process.stdin.send_all(b"go\n")
                held, errors = (await lines.next()).split(" ", 1)
                nursery.cancel_scope.cancel()
        assert errors == "[]"
        assert held == "10"
    finally:
        for stream in flood:
            await stream.aclose()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                await pipe.aclose()


class _Lines:
    """The child's stdout, a line at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            assert chunk, "the child exited early"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


# /events: listeners that stop answering pings ----------------------------------------------


@pytest.mark.parametrize("client", ["silent", "silent-and-not-reading"])
async def test_events_client_that_stops_answering_pings_is_dropped(
    relay: LoopbackRelay,
    client_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    client: str,
) -> None:
    monkeypatch.setattr(server_module, "READ_TIMEOUT", 1.0)
    monkeypatch.setattr(server_module, "WRITE_TIMEOUT", 1.0, raising=False)
    async with metrics_pool(relay, client_context) as (pool, address):
        sock = await upgrade(
            address, receive_buffer=SMALL_RECEIVE_BUFFER if client != "silent" else None
        )
        with sock:
            began = trio.current_time()
            if client != "silent":
                for _ in range(40):
                    pool._events.publish(BIG_EVENT)
                    await trio.sleep(0.01)
            assert held_by_server(address[1]) == 1
            # Pinged every half read timeout, never answering: dropped after the read
            # timeout, or the write timeout if its buffers are full.
            await wait_until(lambda: held_by_server(address[1]) == 0, within=5)
            assert trio.current_time() - began < 4
