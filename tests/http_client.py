"""A small HTTP/1.1 client over real loopback sockets, built on h11 (hypercorn's parser).

The tests talk to the metrics server as Prometheus or curl would, and also as a misbehaving
client would (oversized headers, a request that never finishes), which a full client
library would not let them do.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
import trio


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def request(
    address: tuple[str, int],
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    """Send one request (``Connection: close``) and read the whole response."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        connection = h11.Connection(h11.CLIENT)
        request_headers = [("host", f"{address[0]}:{address[1]}"), ("connection", "close")]
        await stream.send_all(
            connection.send(
                h11.Request(
                    method=method, target=path, headers=[*request_headers, *(headers or [])]
                )
            )
            + connection.send(h11.EndOfMessage())
        )
        response: h11.Response | None = None
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        assert response is not None
        return Response(
            response.status_code,
            {name.decode(): value.decode() for name, value in response.headers},
            body,
        )


async def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send raw bytes and return whatever comes back before the server closes."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some():
                received += chunk
        return received
