"""A JSON-RPC 2.0 relay for the tests: newline-delimited over TLS, or a message per frame
over ``wss://``, on 127.0.0.1.

Its methods are what the tests need to provoke: ``server.ping``, ``echo`` (returns its
params), ``blob`` (a string of N bytes), ``fail`` (an error object), ``garbage`` (a line
that is not JSON), ``nested`` (JSON nested too deep), ``wrong_id``, ``id_true``,
``list_id``, ``null_id_error``, ``neither`` (a reply with no result and no error),
``half_line`` (half a reply, then it hangs up), ``endless`` (bytes with no newline, until
the client goes), ``sleep``, and ``subscribe`` (then `notify` pushes to every subscribed
session); a method named in `failing` is answered with an error. With ``electrum_rules``
it behaves as Electrum servers do: anything before ``server.version`` ends the session.
With ``chunk`` set, every reply leaves in pieces of that many bytes, each its own TLS
record, so no reply fits one read. It is a handler on the testing kit's `LoopbackRelay`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_securechannel.testing import RelayStream

from conftest import new_relay

ERROR_CODE = -32001


class HangUp(Exception):
    """The session ends here (as Electrum servers do on a message before server.version)."""


class _Session:
    def __init__(self, relay: JsonRpcRelay, send: Any) -> None:
        self.relay = relay
        self.send = send  # async (text) -> None: one message
        self.negotiated = False
        self.subscribed = False

    async def handle(self, text: str | bytes) -> None:
        relay = self.relay
        try:
            request = json.loads(text)
        except ValueError:
            await self.send(json.dumps(_error(None, -32700, "parse error")))
            return
        if isinstance(request, list):
            relay.batches += 1
            replies = [await self.answer(item) for item in request]
            await self.send(json.dumps([reply for reply in reversed(replies) if reply]))
            return
        reply = await self.answer(request)
        if reply is not None:
            await self.send(reply if isinstance(reply, str) else json.dumps(reply))

    async def answer(self, request: dict[str, Any]) -> Any:
        relay = self.relay
        method, params, id_ = request["method"], request.get("params", []), request.get("id")
        relay.calls[method] += 1
        if relay.electrum_rules and not self.negotiated and method != "server.version":
            raise HangUp
        if method in relay.failing:
            return _error(id_, ERROR_CODE, f"{method} failed, as the test asked")
        if method == "server.ping":
            return _result(id_, None)
        if method == "server.version":
            self.negotiated = True
            relay.negotiated += 1
            if params[1] == "0.1":
                return _error(id_, 1, "unsupported protocol version: 0.1")
            return _result(id_, ["jsonrpc-relay 1.0", "1.4"])
        if method == "echo":
            return _result(id_, params)
        if method == "blob":
            return _result(id_, "x" * params[0])
        if method == "fail":
            return _error(id_, ERROR_CODE, "it failed", {"why": "asked to"})
        if method == "garbage":
            return "this is not JSON"
        if method == "wrong_id":
            return _result((id_ or 0) + 1000, None)
        if method == "nested":  # valid JSON, nested deeper than any parser should go
            return "[" * 100_000 + "]" * 100_000
        if method == "id_true":  # true == 1 in Python, but not in JSON-RPC
            return {"jsonrpc": "2.0", "id": True, "result": "for id true"}
        if method == "list_id":
            return _result([id_], None)
        if method == "null_id_error":  # as a server answers what it could not parse
            return _error(None, -32700, "parse error at the relay")
        if method == "neither":
            return {"jsonrpc": "2.0", "id": id_}
        if method == "half_line":  # half a reply, then the session ends
            await self.send('{"jsonrpc": "2.0", "id": ', newline=False)
            raise HangUp
        if method == "endless":
            while True:
                await self.send("x" * 65536, newline=False)
        if method == "sleep":
            await trio.sleep(params[0])
            return _result(id_, "slept")
        if method == "subscribe":
            self.subscribed = True
            relay.subscribers.add(self)
            return _result(id_, "subscribed")
        return _error(id_, -32601, f"unknown method {method}")


def _result(id_: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": result}


def _error(id_: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": id_, "error": error}


class JsonRpcRelay:
    """Serve with ``await nursery.start(relay.serve_tls)`` or ``relay.serve_wss``: the
    testing kit's `LoopbackRelay` (``relay.loopback``, whose faults apply) with this
    relay's sessions as its handler."""

    def __init__(self, *, electrum_rules: bool = False) -> None:
        self.loopback = new_relay(handler=self._handle)
        self.electrum_rules = electrum_rules
        self.sessions = 0
        self.negotiated = 0  # sessions that sent server.version
        self.hung_up = 0  # sessions ended for breaking Electrum's rules
        self.batches = 0
        self.failing: set[str] = set()  # methods answered with an error object
        self.calls: Counter[str] = Counter()
        self.subscribers: set[_Session] = set()

    @property
    def chunk(self) -> int | None:
        """Send replies in pieces this big, each its own TLS record, apart."""
        return self.loopback.piece_size

    @chunk.setter
    def chunk(self, size: int | None) -> None:
        self.loopback.piece_size = size

    @property
    def port(self) -> int:
        return self.loopback.port

    @property
    def over_websocket(self) -> bool:
        return self.loopback.websocket

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/rpc"

    @property
    def address(self) -> str:
        """What a pool is given: `url` once serving ``wss://``, else `target`."""
        return self.url if self.over_websocket else self.target

    async def notify(self, method: str, *params: Any) -> int:
        """Push a notification to every subscribed session; how many it reached."""
        message = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params)})
        reached = 0
        for session in list(self.subscribers):
            try:
                await session.send(message)
                reached += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
                self.subscribers.discard(session)
        return reached

    async def serve_tls(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.loopback.serve(task_status=task_status)

    async def serve_wss(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.loopback.websocket = True
        self.loopback.path = "/rpc"
        await self.loopback.serve(task_status=task_status)

    async def _handle(self, connection: Any) -> None:
        if isinstance(connection, RelayStream):
            await self._handle_tls(connection)
        else:
            await self._handle_ws(connection)

    async def _handle_tls(self, stream: RelayStream) -> None:
        self.sessions += 1

        async def send(text: str, *, newline: bool = True) -> None:
            await stream.send_all(text.encode() + (b"\n" if newline else b""))

        session = _Session(self, send)
        buffer = b""
        try:
            while data := await stream.receive_some():
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await session.handle(line)
        except HangUp:
            self.hung_up += 1
            with trio.move_on_after(1):
                await stream.aclose()  # a TLS close_notify, as a server that ends a session
        finally:
            self.subscribers.discard(session)

    async def _handle_ws(self, connection: WebSocketConnection) -> None:
        self.sessions += 1

        async def send(text: str, *, newline: bool = True) -> None:
            await connection.send_message(text)

        session = _Session(self, send)
        try:
            while True:
                await session.handle(await connection.get_message())
        except HangUp:
            self.hung_up += 1
            await connection.aclose()
        finally:
            self.subscribers.discard(session)
