"""HTTP/1.1 over the pool, and measurement 10: the same GET through our pool and httpcore's.

Our side writes the very bytes httpcore (h11) sends for ``GET /bench`` with no extra headers,
and reads the response by its Content-Length, as a thin client on top of the pool would.
"""

from __future__ import annotations

import math

import httpcore
import trio

from trio_securechannel import open_pool

from ._bench import Bench
from ._clients import fill, in_tasks
from ._measure import Run, cpu_spread, paired_ratio, timed
from ._report import Result
from ._server import HTTP_BODY

TASKS = 16
PATH = "/bench"
_MAX_HEAD = 64 * 1024


def request_bytes(address: tuple[str, int], path: str = PATH) -> bytes:
    """What h11 writes for ``GET path`` when httpcore is given no headers but Host."""
    host, port = address
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode("ascii")


async def exchange(stream: trio.abc.Stream, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request``; read the response's head, then its body by Content-Length."""
    await stream.send_all(request)
    buffer = bytearray()
    end = -1
    while end < 0:
        if len(buffer) > _MAX_HEAD:
            raise ValueError("response head too long")
        data = await stream.receive_some()
        if not data:
            raise trio.BrokenResourceError("the server closed the connection mid-response")
        buffer += data
        end = buffer.find(b"\r\n\r\n")
    head = bytes(buffer[:end])
    length = _content_length(head)
    body = buffer[end + 4 :]
    while len(body) < length:
        data = await stream.receive_some(length - len(body))
        if not data:
            raise trio.BrokenResourceError("the server closed the connection mid-body")
        body += data
    return head, bytes(body)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("response without Content-Length")


async def get_close(address: tuple[str, int], path: str) -> bytes:
    """One plain-HTTP GET with ``Connection: close``; the body (status 200 required)."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        host, port = address
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while data := await stream.receive_some():
            chunks.append(data)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head[:60]!r}")
    return body


async def peer_http(bench: Bench) -> list[Result]:
    """10: client CPU per GET, 16 tasks: our pool vs httpcore's AsyncConnectionPool."""
    address = bench.servers.http
    each = bench.scale.requests_per_task
    request = request_bytes(address)
    url = f"https://{address[0]}:{address[1]}{PATH}"

    async def ours_exchange(stream: trio.abc.Stream) -> None:
        head, body = await exchange(stream, request)
        if not head.startswith(b"HTTP/1.1 200") or body != HTTP_BODY:
            raise RuntimeError(f"unexpected response {head[:60]!r}")

    async with (
        open_pool(
            address,
            ssl_context=bench.client_context(),
            max_connections=TASKS,
            acquire_timeout=math.inf,
        ) as pool,
        httpcore.AsyncConnectionPool(
            ssl_context=bench.client_context(), max_connections=TASKS
        ) as peer,
    ):
        await fill(pool, TASKS, exchange=ours_exchange)

        async def ours_get() -> None:
            async with pool.connection() as channel:
                await ours_exchange(channel)

        async def peer_get() -> None:
            response = await peer.request("GET", url)
            if response.status != 200 or response.content != HTTP_BODY:
                raise RuntimeError(f"unexpected response {response.status}")

        async def ours() -> Run:
            return (await timed(lambda: in_tasks(TASKS, ours_get, each))).throughput()

        async def httpcore_run() -> Run:
            return (await timed(lambda: in_tasks(TASKS, peer_get, each))).throughput()

        runs = await bench.compare({"ours": ours, "httpcore": httpcore_run})
    ours_cpu, peer_cpu = (cpu_spread(runs[name]) for name in ("ours", "httpcore"))
    assert ours_cpu is not None
    assert peer_cpu is not None
    ratio = paired_ratio(runs["httpcore"], runs["ours"], cpu=True)
    return [
        Result(
            "10", "http", "HTTP/1.1 GET, 16 tasks, pool of 16", "requests/s",
            runs["ours"], "httpcore AsyncConnectionPool (trio)", runs["httpcore"],
            ratio, "less CPU", ">= 3x less CPU per request", ratio >= 3,
            (f"{each} requests per task per repeat, same request bytes, same TLS server;"
             f" the target is on client CPU µs/request: ours {ours_cpu.median:.1f},"
             f" httpcore {peer_cpu.median:.1f}",),
        )
    ]  # fmt: skip
