"""JSON-RPC 2.0 over a pool: calls, batches and subscriptions, no ids or framing to handle.

Over raw TLS relays each message is one line of JSON (newline-delimited, as Electrum
servers and Stratum pools speak); over ``wss://`` relays, one WebSocket message::

    async with sc.open_pool("electrum.example:50002", setup=electrum_handshake("my-app")) as pool:
        client = JsonRpcClient(pool)
        header = await client.call("blockchain.block.header", 800_000)
        async with client.subscribe("blockchain.headers.subscribe") as headers:
            async for notification in headers:
                print(notification.params)

A call takes a channel from the pool for one request and its reply, and gives it back at
a message boundary. A subscription keeps its channel (the relay pushes to it) and never
gives it back to the pool. An error object in a reply raises `RpcError` and leaves the
relay in good standing (it answered); a reply that is not JSON-RPC raises
`~trio_securechannel.ProtocolError` and counts against it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, final

import trio

from ._channel import NO_DEADLINE, Channel, SecureChannel
from ._config import Setup, check_seconds
from ._errors import ProtocolError, SecureChannelError
from ._pool import SecureChannelPool
from ._websocket import WebSocketChannel

__all__ = [
    "JsonRpcChannel",
    "JsonRpcClient",
    "Notification",
    "RpcError",
    "Subscription",
    "electrum_handshake",
]

#: The most notifications a channel keeps for its reader while a call waits for its reply.
MAX_QUEUED_NOTIFICATIONS = 10_000

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


@final
class RpcError(SecureChannelError):
    """A relay answered a call with a JSON-RPC error object.

    The relay did its part: the channel goes back to the pool and nothing counts against
    the relay.

    Attributes:
        code (int): The error object's ``code`` (JSON-RPC reserves -32768 to -32000:
            -32601 method not found, -32602 invalid params, ...).
        message (str): Its ``message``.
        data (Any): Its ``data`` member, if any (None otherwise).
        method (str): The method called.
        endpoint (str): The relay that answered.
    """

    def __init__(self, code: int, message: str, data: Any, method: str, endpoint: str) -> None:
        self._args = (code, message, data, method, endpoint)
        self.code = code
        self.message = message
        self.data = data
        self.method = method
        self.endpoint = endpoint
        super().__init__(f"{endpoint} answered {method} with error {code}: {message}")


@final
@dataclass(frozen=True)
class Notification:
    """A message a relay pushed (a request without an id): its method and params.

    Attributes:
        method (str): The notification's ``method`` (for an Electrum subscription, the
            subscribing method's name).
        params (Any): Its ``params``, as decoded from JSON (a list or an object).
    """

    method: str
    params: Any


class JsonRpcChannel:
    """JSON-RPC over one channel you hold: in a ``setup``, or a subscription's.

    Calls made on it are answered one at a time, in order; notifications the relay pushes
    meanwhile are kept for `next_notification` (and ``async for``), in order.

    Args:
        channel: A `~trio_securechannel.SecureChannel` (newline-delimited JSON) or a
            `~trio_securechannel.WebSocketChannel` (a message each).
        time_limit: Seconds each call's reply may take (`RequestTimeout` past it); None:
            the channel's own deadline, if any.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        time_limit: float | None = None,
        _ids: Iterator[int] | None = None,
    ) -> None:
        if not isinstance(channel, SecureChannel | WebSocketChannel):
            raise TypeError(f"JSON-RPC needs a pool's channel, got {type(channel).__name__}")
        self.channel = channel
        self._time_limit = time_limit
        self._ids = _ids if _ids is not None else itertools.count(1)
        self._notifications: deque[Notification] = deque()
        self._busy = False  # a call or a wait for a notification is under way

    async def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with ``params``; return its result.

        Raises:
            RpcError: The relay answered with an error object.
            ProtocolError: The reply is not a JSON-RPC reply to this call.
            RequestTimeout: No reply within the time limit.
            TypeError: ``params`` are not JSON-serialisable.
        """
        request_id = next(self._ids)
        payload = _request(request_id, method, params)
        with self._turn(), self._limited():
            outcome = await _exchange(
                self.channel, payload, request_id, method, self._notifications
            )
        if type(outcome) is RpcError:
            raise outcome
        return outcome

    async def batch(self, calls: Iterable[Sequence[Any]]) -> list[Any]:
        """Send several calls in one message; return their outcomes in the same order.

        Each call is ``(method, *params)``. Each outcome is the call's result, or the
        `RpcError` it was answered with (returned, not raised, so that no result is lost).
        """
        payload, requests = _batch_request(calls, self._ids)
        with self._turn(), self._limited():
            return await _exchange_batch(self.channel, payload, requests, self._notifications)

    async def next_notification(self) -> Notification:
        """The next notification the relay pushed, waiting for it as long as it takes.

        Raises:
            trio.BrokenResourceError: The relay closed the channel.
            ProtocolError: The relay sent something other than a notification.
        """
        if self._notifications:
            await trio.lowlevel.checkpoint()
            return self._notifications.popleft()
        with self._turn():
            message = await _receive(self.channel)
        notification = _as_notification(message)
        if notification is None:
            self.channel.blame_relay()
            raise ProtocolError(str(self.channel.endpoint), "a reply nobody asked for")
        return notification

    def __aiter__(self) -> AsyncIterator[Notification]:
        return self

    async def __anext__(self) -> Notification:
        return await self.next_notification()

    def _limited(self) -> _Deadline:
        return _Deadline(self.channel, self._time_limit)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """One call or wait at a time, refused before anything is sent: a reply read by
        another task's wait would look unasked-for, and the relay would be blamed."""
        if self._busy:
            raise trio.BusyResourceError(
                "another task is calling or waiting on this JSON-RPC channel; one at a time"
            )
        self._busy = True
        try:
            yield
        finally:
            self._busy = False


@final
class Subscription(JsonRpcChannel):
    """A subscription's held channel (see `JsonRpcClient.subscribe`): iterate it for the
    notifications; `call` on it adds more subscriptions on the same channel.

    Attributes:
        result: The subscribe call's own result (Electrum's: the current state).
    """

    result: Any = None


class JsonRpcClient:
    """JSON-RPC 2.0 calls over a pool's channels.

    Args:
        pool: The pool. Its raw TLS relays carry newline-delimited JSON; a pool with only
            ``wss://`` relays carries a JSON message per WebSocket message.
        timeout: Seconds each call's relay has to answer (`RequestTimeout` past it, held
            against the relay); None: the pool's ``request_timeout``; ``math.inf``: no
            limit but your own cancel scopes (which abort a call and blame nobody).
    """

    def __init__(self, pool: SecureChannelPool, *, timeout: float | None = None) -> None:
        if not isinstance(pool, SecureChannelPool):
            raise TypeError(f"JsonRpcClient needs a SecureChannelPool, got {type(pool).__name__}")
        if timeout is not None:
            check_seconds("timeout", timeout, positive=True)
        self.pool = pool
        self._timeout = timeout
        self._websocket = all(endpoint.is_websocket for endpoint in pool.endpoints)
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<JsonRpcClient on {self.pool!r}>"

    async def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with ``params`` on a channel from the pool; return its result.

        Raises:
            RpcError: The relay answered with an error object (the channel is pooled again).
            ProtocolError: The reply is not a JSON-RPC reply to this call (the channel is
                discarded, the relay held responsible).
            RequestTimeout: No reply within the client's time limit.
            TypeError: ``params`` are not JSON-serialisable (nothing was sent).
            And those of `~trio_securechannel.SecureChannelPool.connection`.
        """
        request_id = next(self._ids)
        payload = _request(request_id, method, params)  # before a channel is taken
        async with self._checkout(self._timeout) as channel:
            outcome = await _exchange(channel, payload, request_id, method, None)
        if type(outcome) is RpcError:  # raised once the channel is back: the relay answered
            raise outcome
        return outcome

    async def batch(self, calls: Iterable[Sequence[Any]]) -> list[Any]:
        """Send several calls in one message on one channel; see `JsonRpcChannel.batch`."""
        payload, requests = _batch_request(calls, self._ids)  # before a channel is taken
        async with self._checkout(self._timeout) as channel:
            return await _exchange_batch(channel, payload, requests, None)

    @asynccontextmanager
    async def subscribe(self, method: str, *params: Any) -> AsyncIterator[Subscription]:
        """Call a subscribing ``method`` and hold its channel for the notifications.

        ``async with client.subscribe(...) as subscription:`` gives a `Subscription`:
        its ``result`` is the call's own, and ``async for notification in subscription``
        yields every `Notification` the relay pushes to the channel. The channel stays
        checked out while the block runs (waiting for notifications has no time limit;
        calls on it have the client's), and is closed after it, never pooled again: the
        relay would keep pushing to it.
        """
        async with self._checkout(math.inf) as channel:
            channel.retire_when_returned("subscribed")
            subscription = Subscription(channel, time_limit=self._time_limit(), _ids=self._ids)
            subscription.result = await subscription.call(method, *params)
            yield subscription

    def _checkout(self, timeout: float | None) -> Any:
        if self._websocket:
            return self.pool.websocket(timeout=timeout)
        return self.pool.connection(timeout=timeout)

    def _time_limit(self) -> float | None:
        limit = self._timeout if self._timeout is not None else self.pool.config.request_timeout
        return None if limit is None or limit == math.inf else limit


def electrum_handshake(
    client_name: str, protocol: str | tuple[str, str] = ("1.4", "1.4.2")
) -> Setup:
    """A ``setup`` for Electrum servers: ``server.version`` on each new channel.

    Electrum servers require it as the first message of every session and hang up on
    anything else; ``protocol`` is the version, or the range ``(min, max)``, the client
    speaks. A server that supports none of them answers with an error, which fails the
    connect (`ConnectError`, phase ``"setup"``).
    """
    if not isinstance(client_name, str) or not client_name:
        raise ValueError(f"electrum_handshake: client_name must be a name, got {client_name!r}")
    version = protocol if isinstance(protocol, str) else list(protocol)

    async def server_version(channel: Channel) -> None:
        await JsonRpcChannel(channel).call("server.version", client_name, version)

    return server_version


# -- the wire ------------------------------------------------------------------------------


class _Deadline:
    """While a call waits on a held channel: a deadline ``limit`` from now, or the one the
    channel already had if sooner; the channel's own comes back after."""

    __slots__ = ("_channel", "_limit", "_saved")

    def __init__(self, channel: Channel, limit: float | None) -> None:
        self._channel, self._limit = channel, limit
        self._saved: tuple[float, float | None] = (NO_DEADLINE, None)

    def __enter__(self) -> None:
        channel, limit = self._channel, self._limit
        if limit is not None:
            self._saved = (channel.deadline, channel.request_timeout)
            deadline = trio.current_time() + limit
            if deadline < channel.deadline:
                channel.deadline, channel.request_timeout = deadline, limit

    def __exit__(self, *exc_info: object) -> None:
        if self._limit is not None:
            self._channel.deadline, self._channel.request_timeout = self._saved


def _batch_request(
    calls: Iterable[Sequence[Any]], ids: Iterator[int]
) -> tuple[str, list[tuple[int, str, Sequence[Any]]]]:
    requests = [(next(ids), *_method_and_params(call)) for call in calls]
    if not requests:
        raise ValueError("batch: no calls given")
    return "[" + ",".join(_request(*request) for request in requests) + "]", requests


def _method_and_params(call: Sequence[Any]) -> tuple[str, Sequence[Any]]:
    if isinstance(call, str) or not isinstance(call, Sequence) or not call:
        raise TypeError(f"batch: each call is (method, *params), got {call!r}")
    return call[0], call[1:]


def _request(request_id: int, method: str, params: Sequence[Any]) -> str:
    if not isinstance(method, str) or not method:
        raise TypeError(f"a JSON-RPC method is a non-empty str, got {method!r}")
    try:
        return _encode({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the params of {method} are not JSON: {exc}") from None


async def _send(channel: Channel, payload: str) -> None:
    if isinstance(channel, SecureChannel):
        await channel.send_all((payload + "\n").encode())
    else:
        assert isinstance(channel, WebSocketChannel)
        await channel.send_message(payload)


async def _receive(channel: Channel) -> Any:
    """The next message from the relay, decoded; a relay that sends something that is
    not JSON is held responsible."""
    if isinstance(channel, SecureChannel):
        data: str | bytes = await channel.receive_line()
    else:
        assert isinstance(channel, WebSocketChannel)
        try:
            data = await channel.get_message()
        except trio.BrokenResourceError as exc:
            if channel.errors["too_big"]:  # the same error as a line over its limit
                raise ProtocolError(str(channel.endpoint), str(exc)) from exc
            raise
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # (JSONDecodeError, UnicodeDecodeError; nesting)
        raise _broke(channel, f"a message that is not JSON: {_excerpt(data)}") from None


async def _exchange(
    channel: Channel,
    payload: str,
    request_id: int,
    method: str,
    notifications: deque[Notification] | None,
) -> Any:
    """Send one request and read until its reply: its result, or its error as an `RpcError`
    (returned). Notifications that come first are kept (a pooled channel gets none: it
    carried no subscription)."""
    await _send(channel, payload)
    while True:
        message = await _receive(channel)
        if isinstance(message, dict) and message.get("id") is not None:
            reply_id = message["id"]
            if type(reply_id) is not int or reply_id != request_id:  # (True == 1 in Python)
                raise _broke(channel, f"a reply to request {reply_id!r}, not {request_id}")
            return _outcome(message, method, channel)
        _keep_notification(channel, message, notifications)


async def _exchange_batch(
    channel: Channel,
    payload: str,
    requests: list[tuple[int, str, Sequence[Any]]],
    notifications: deque[Notification] | None,
) -> list[Any]:
    await _send(channel, payload)
    while True:
        message = await _receive(channel)
        if isinstance(message, list):
            break
        _keep_notification(channel, message, notifications)
    asked = {id_ for id_, _, _ in requests}
    replies: dict[int, dict[str, Any]] = {}
    for reply in message:
        reply_id = reply.get("id") if isinstance(reply, dict) else None
        if type(reply_id) is not int or reply_id not in asked or reply_id in replies:
            raise _broke(channel, f"a batch reply with a reply nobody asked for: {reply!r:.80}")
        replies[reply_id] = reply
    missing = sorted(asked - replies.keys())
    if missing:
        raise _broke(channel, f"a batch reply without replies to requests {missing}")
    return [_outcome(replies[id_], method, channel) for id_, method, _ in requests]


def _keep_notification(
    channel: Channel, message: Any, notifications: deque[Notification] | None
) -> None:
    notification = _as_notification(message)
    if notification is None:
        error = message.get("error") if isinstance(message, dict) else None
        if isinstance(error, dict):  # (id null: it could not tell which request it answers)
            raise _broke(channel, f"an error for no request in particular: {error!r:.120}")
        raise _broke(
            channel, f"a message that is neither a reply nor a notification: {message!r:.80}"
        )
    if notifications is not None:
        if len(notifications) >= MAX_QUEUED_NOTIFICATIONS:
            raise _broke(
                channel, f"over {MAX_QUEUED_NOTIFICATIONS} notifications while a call waited"
            )
        notifications.append(notification)


def _as_notification(message: Any) -> Notification | None:
    if isinstance(message, dict) and message.get("id") is None:
        method = message.get("method")
        if isinstance(method, str):
            return Notification(method, message.get("params"))
    return None


def _outcome(reply: dict[str, Any], method: str, channel: Channel) -> Any:
    """A reply's result, or its error object as an `RpcError` (returned, for the caller to
    raise once the channel is back); a reply with neither breaks the protocol."""
    error = reply.get("error")
    if error is None and "result" in reply:
        return reply["result"]
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str):
            return RpcError(code, message, error.get("data"), method, str(channel.endpoint))
    raise _broke(channel, f"a reply to {method} with neither a result nor an error: {reply!r:.80}")


def _broke(channel: Channel, what: str) -> ProtocolError:
    channel.blame_relay()
    return ProtocolError(str(channel.endpoint), f"the relay sent {what}")


def _excerpt(data: str | bytes) -> str:
    return repr(data[:60]) + ("..." if len(data) > 60 else "")
