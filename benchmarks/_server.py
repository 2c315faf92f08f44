"""The loopback TLS server, run in its own process (pinned to its own CPU when possible).

These services on 127.0.0.1, each on a free port:

- echo: every byte received is sent back (cases 1-5, 7, 8, 12);
- sink: an 8-byte big-endian length, then that many bytes, answered with one byte
  (case 6, bulk throughput);
- http: a keep-alive HTTP/1.1 server answering every request with a 64-byte body (case 10);
- ws: a WebSocket echo (trio-websocket over the same TLS): every message sent back (case 11);
- relays: `RELAYS` more echo services, each on a port of its own, so that a pool can be
  spread over that many distinct relays (case 12).

The process stops when the parent says so (or closes its end of the pipe), and in any case
after ``lifetime`` seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from ._tls import HOST, server_context

#: The body of every HTTP response: as many bytes as an echo round trip carries.
HTTP_BODY = bytes(range(64))
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Length: " + str(len(HTTP_BODY)).encode() + b"\r\n"
    b"\r\n" + HTTP_BODY
)
_MAX_HEADER_BYTES = 64 * 1024
_CHUNK = 256 * 1024

#: How many distinct echo relays (ports) the server offers besides ``echo``.
RELAYS = 16

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


@dataclass(frozen=True)
class Addresses:
    """Where the server's services listen."""

    echo: tuple[str, int]
    sink: tuple[str, int]
    http: tuple[str, int]
    ws: tuple[str, int]
    relays: tuple[tuple[str, int], ...]  # `RELAYS` echo services, one port each


@contextmanager
def running_server(
    server_file: Path, *, cpu: int | None, lifetime: float = 1800.0
) -> Iterator[Addresses]:
    """Start the server process, yield its addresses, stop it (bounded) on exit."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=serve, args=(str(server_file), cpu, theirs, lifetime), name="bench-server"
    )
    process.start()
    theirs.close()
    try:
        if not ours.poll(30.0):
            raise RuntimeError("the benchmark server did not start within 30 s")
        echo, sink, http, ws, *relays = ours.recv()
        yield Addresses(
            (HOST, echo), (HOST, sink), (HOST, http), (HOST, ws),
            tuple((HOST, port) for port in relays),
        )  # fmt: skip
    finally:
        ours.close()  # the server's watcher sees EOF and shuts down
        process.join(10.0)
        if process.is_alive():
            process.terminate()
            process.join(5.0)


def serve(server_file: str, cpu: int | None, pipe: Connection, lifetime: float) -> None:
    """Entry point of the server process."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    trio.run(_serve, server_context(Path(server_file)), pipe, lifetime)


async def _serve(context: ssl.SSLContext, pipe: Connection, lifetime: float) -> None:
    async with trio.open_nursery() as nursery:
        ports = []
        for handler in (_echo, _sink, _http, _ws_echo, *[_echo] * RELAYS):
            listeners: list[trio.SocketListener] = await nursery.start(
                partial(trio.serve_tcp, partial(_tls, context, handler), 0, host=HOST)
            )
            ports.append(listeners[0].socket.getsockname()[1])
        pipe.send(tuple(ports))
        with trio.move_on_after(lifetime):
            await trio.to_thread.run_sync(_wait_for_stop, pipe, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


def _wait_for_stop(pipe: Connection) -> None:
    with suppress(EOFError, OSError):
        pipe.recv()


async def _tls(context: ssl.SSLContext, handler: Handler, transport: trio.SocketStream) -> None:
    stream = trio.SSLStream(transport, context, server_side=True)
    try:
        await handler(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # a client that went away without a goodbye: fine for a benchmark server
    finally:
        await trio.aclose_forcefully(stream)


async def _echo(stream: trio.SSLStream[Any]) -> None:
    while data := await stream.receive_some(_CHUNK):
        await stream.send_all(data)


async def _sink(stream: trio.SSLStream[Any]) -> None:
    while True:
        header = b""
        while len(header) < 8:
            data = await stream.receive_some(8 - len(header))
            if not data:
                return
            header += data
        remaining = int.from_bytes(header, "big")
        while remaining:
            data = await stream.receive_some(min(remaining, _CHUNK))
            if not data:
                return
            remaining -= len(data)
        await stream.send_all(b"\x01")


async def _http(stream: trio.SSLStream[Any]) -> None:
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(buffer) > _MAX_HEADER_BYTES:
                return
            data = await stream.receive_some(_CHUNK)
            if not data:
                return
            buffer += data
            end = buffer.find(b"\r\n\r\n")
        del buffer[: end + 4]  # GET requests: no body
        await stream.send_all(HTTP_RESPONSE)


async def _ws_echo(stream: trio.SSLStream[Any]) -> None:
    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        session = await request.accept()
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                await session.send_message(await session.get_message())
        nursery.cancel_scope.cancel()
