"""The ElectrumX harness itself: a real ElectrumX serves the stub regtest chain over TLS and
WSS, and announces the blocks mined while it runs. Spoken to with Trio's own streams only,
so a failure here is the harness's, not a client's."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

import electrumx_runner
from electrumx_daemon import GENESIS, REGTEST_GENESIS_HASH
from electrumx_runner import ElectrumX, requires_electrumx, run_electrumx
from helpers import closed_port

pytestmark = requires_electrumx


class LineClient:
    """Newline-delimited JSON-RPC over a TLS stream, read one message at a time."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, request_id: int, method: str, *params: Any) -> None:
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)}
        await self.stream.send_all(json.dumps(request).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            assert data, "ElectrumX closed the connection"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)  # the padding is JSON whitespace
        return message


async def connect(server: ElectrumX) -> LineClient:
    host, port = server.ssl_target.rsplit(":", 1)
    context = ssl.create_default_context()
    server.ca.configure_trust(context)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
    return LineClient(stream)


async def test_ssl_version_then_headers_of_mined_blocks(tmp_path: Path) -> None:
    """Over raw TLS: the version handshake, the tip, a mined block's notification."""
    async with run_electrumx(tmp_path, blocks=5) as server:
        assert server.height == 5
        client = await connect(server)
        async with client.stream:
            with trio.fail_after(10):
                await client.send(1, "server.version", "test", "1.4")
                reply = await client.receive()
                assert reply["id"] == 1
                software, protocol = reply["result"]
                assert software.startswith("ElectrumX")
                assert protocol == "1.4"

                await client.send(2, "blockchain.headers.subscribe")
                reply = await client.receive()
                assert reply["id"] == 2
                assert reply["result"] == {"height": 5, "hex": server.tip.header.hex()}

                (block,) = server.mine()
                notification = await client.receive()
                assert notification["method"] == "blockchain.headers.subscribe"
                assert "id" not in notification
                assert notification["params"] == [{"height": 6, "hex": block.header.hex()}]
                assert server.height == 6

                await client.send(3, "blockchain.block.header", 0)
                reply = await client.receive()
                assert reply == {"jsonrpc": "2.0", "id": 3, "result": GENESIS.header.hex()}


async def test_wss_and_server_version_first(tmp_path: Path) -> None:
    """Over WSS the same server answers; over TLS it refuses a session without a version."""
    async with run_electrumx(tmp_path, blocks=2) as server:
        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(
                server.wss_url, ssl_context=server.client_context()
            ) as websocket:
                for request_id, method, params in [
                    (1, "server.version", ["test", "1.4"]),
                    (2, "server.features", []),
                ]:
                    request = {"jsonrpc": "2.0", "id": request_id, "method": method}
                    await websocket.send_message(json.dumps({**request, "params": params}))
                    reply = json.loads(await websocket.get_message())
                    assert reply["id"] == request_id
                assert reply["result"]["genesis_hash"] == REGTEST_GENESIS_HASH

            # ElectrumX wants server.version first: anything else is refused, then the
            # connection closed; before the refusal come two bare notifications, meant to
            # crash old Electrum clients.
            client = await connect(server)
            async with client.stream:
                await client.send(1, "blockchain.headers.subscribe")
                notifications = [await client.receive(), await client.receive()]
                assert [n["method"] for n in notifications] == [
                    "blockchain.relayfee",
                    "blockchain.estimatefee",
                ]
                reply = await client.receive()
                assert reply["id"] == 1
                assert reply["error"]["message"] == "use server.version to identify client"
                assert await client.stream.receive_some() == b""


async def test_a_port_taken_before_electrumx_binds_it_means_fresh_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ports are free when chosen; anything may take one before ElectrumX binds it (a
    # pool's client socket in another test, say). Here a listener takes the SSL port.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        chosen: list[list[int]] = []

        def free_ports(count: int) -> list[int]:
            ports = [taken, closed_port()] if not chosen else real_free_ports(count)
            chosen.append(ports)
            return ports

        real_free_ports = electrumx_runner._free_ports
        monkeypatch.setattr(electrumx_runner, "_free_ports", free_ports)
        async with run_electrumx(tmp_path, blocks=2) as electrumx:
            assert len(chosen) == 2  # started again, on fresh ports
            assert taken not in (electrumx.ssl_port, electrumx.wss_port)
            client = await connect(electrumx)
            await client.send(1, "server.version", "harness", "1.4")
            assert (await client.receive())["id"] == 1
            await client.stream.aclose()
