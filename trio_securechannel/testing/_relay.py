"""`LoopbackRelay`: a TLS relay on 127.0.0.1 (or in memory) whose faults a test switches."""

from __future__ import annotations

import errno
import socket
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, final

import trio
import trio.testing
import trustme
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from ._certificates import client_context, server_context
from ._faults import Fault
from ._streams import RelayStream, Wire, reset_socket

Handler = Callable[[RelayStream], Awaitable[None]]
WebSocketHandler = Callable[[WebSocketConnection], Awaitable[None]]

#: How a connection ends from under its handler: the client left, or the relay cut it.
_CONNECTION_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError)

#: The port in `LoopbackRelay.address` when it serves in memory only (nothing dials it).
MEMORY_PORT = 443

#: Seconds a ``wss://`` session's close handshake may take before the connection goes.
CLOSE_TIMEOUT = 1.0

#: Accept errors that mean "out of resources for now": wait, then accept again.
_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def echo(stream: RelayStream) -> None:
    """The default raw-TLS handler: send back what arrives, until the client closes."""
    while data := await stream.receive_some():
        await stream.send_all(data)


async def echo_messages(session: WebSocketConnection) -> None:
    """The default ``wss://`` handler: send back each message, until the session ends."""
    while True:
        await session.send_message(await session.get_message())


@final
class LoopbackRelay:
    """A relay for tests: TLS on 127.0.0.1 with a throwaway CA, or in memory.

    It echoes, or runs ``handler`` on each connection: ``await handler(stream)`` with a
    `RelayStream` over raw TLS, or ``await handler(session)`` with a trio-websocket
    `~trio_websocket.WebSocketConnection` when ``websocket=True``. Set `fault` (a `Fault`),
    `latency`, `piece_size`, `idle_close_after` or `tickets_after` at any time; its counters
    say what reached it. Start it with `open_relay`, or ``await nursery.start(relay.serve)``.

    Args:
        handler: What serves each connection (default: echo).
        websocket: Serve ``wss://`` (WebSocket over the same TLS) at ``path``.
        path: The WebSocket path in `address`.
        ca: The CA that signs its certificate (default: a new throwaway one). Share one
            between relays to share one client context.
        tls_context: A server context of your own instead (then `client_context` does not
            know what trusts it).
    """

    def __init__(
        self,
        handler: Handler | WebSocketHandler | None = None,
        *,
        websocket: bool = False,
        path: str = "/",
        ca: trustme.CA | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be an async function, got {handler!r}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        self.handler = handler
        self.websocket = websocket
        self.path = path
        self.ca = ca if ca is not None else trustme.CA(organization_name="throwaway test CA")
        self.tls_context = tls_context if tls_context is not None else server_context(self.ca)
        self.host = "127.0.0.1"
        self.port = 0
        self._fault = Fault.NONE
        #: Seconds every send waits first (replies and pushes; not a wss:// upgrade).
        self.latency = 0.0
        #: Send every write in pieces this many bytes long, each its own TLS record, apart.
        self.piece_size: int | None = None
        #: Close a connection (TLS close_notify) once a read waited this long for a request.
        self.idle_close_after = float("inf")
        #: Send the TLS 1.3 session tickets this long after the handshake (a callable is
        #: drawn per connection); None: with the first reply, as trio does.
        self.tickets_after: float | Callable[[], float] | None = None
        #: Raw TLS: bytes sent unasked right behind each reply, in the same TCP segment, as
        #: Electrum servers push notifications.
        self.push_behind_reply: bytes | None = None
        #: The push's last 20 bytes follow this much later (half a record waits meanwhile).
        self.push_split_after: float | None = None
        #: ``wss://``: the subprotocol chosen when the client offers it.
        self.subprotocol: str | None = None
        #: In memory: seconds each connect takes.
        self.connect_delay = 0.0

        # Counters, for assertions.
        self.accepted = 0  # connections accepted (TCP, or in memory)
        self.handshakes = 0  # TLS handshakes completed
        self.handshaking = 0
        self.max_handshaking = 0
        self.active = 0  # connections past the accept, not yet ended
        self.max_active = 0
        self.requests = 0  # reads that returned data
        self.bytes_received = 0  # plaintext
        self.bytes_sent = 0  # plaintext, pushes too
        #: How connections ended: "close_notify" (the client closed cleanly), "ragged" (the
        #: connection broke), "reset" (the relay reset it), "idle_close" (the relay closed it
        #: idle), "handler_returned", "before_tls" (`Fault.NO_TLS`).
        self.endings: Counter[str] = Counter()
        self.upgrades = 0  # wss://: upgrade requests seen
        self.request_headers: dict[str, str] = {}  # wss://: the last upgrade request's
        self.request_paths: list[str] = []  # wss://: what each upgrade asked for (and query)
        self.offered_subprotocols: tuple[str, ...] = ()
        self.sessions: set[WebSocketConnection] = set()
        self.max_sessions = 0
        #: wss://: how each session ended: the close code, or 1006 without a close frame.
        self.close_codes: Counter[int] = Counter()
        self.connect_times: list[float] = []  # in memory: when each connect began
        self.connecting = 0
        self.max_connecting = 0

        self._nursery: trio.Nursery | None = None
        self._listener: trio.SocketListener | None = None
        self._wires: set[Wire] = set()
        self._streams: set[RelayStream] = set()
        self._session_streams: dict[WebSocketConnection, RelayStream] = {}
        self._changed = trio.Event()

    # -- where clients go ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """What a pool is given: ``127.0.0.1:PORT``, or ``wss://127.0.0.1:PORT/path``."""
        return self.url if self.websocket else f"{self.host}:{self.port}"

    @property
    def target(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"wss://{self.host}:{self.port}{self.path}"

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this relay's CA, and nothing else."""
        return client_context(self.ca)

    # -- switches ------------------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        """The fault in force (`Fault.NONE`: serving)."""
        return self._fault

    @fault.setter
    def fault(self, fault: Fault) -> None:
        fault = Fault(fault)
        if fault is Fault.REJECT_UPGRADE and not self.websocket:
            raise ValueError("Fault.REJECT_UPGRADE needs a wss:// relay (websocket=True)")
        was, self._fault = self._fault, fault
        if fault is Fault.REFUSE and was is not Fault.REFUSE:
            self._close_listener()
        elif was is Fault.REFUSE and fault is not Fault.REFUSE:
            self._listen_again()
        self._changed.set()
        self._changed = trio.Event()

    async def setting_changed(self) -> None:
        """Wait until `fault` is set again."""
        await self._changed.wait()

    def kill_connections(self) -> None:
        """Reset every open connection at once (RST), as a crashing relay would."""
        for wire in list(self._wires):
            wire.reset()

    def reset(self, connection: RelayStream | WebSocketConnection) -> None:
        """Reset one connection now (RST): a handler's `RelayStream`, or its ``wss://``
        session."""
        if isinstance(connection, RelayStream):
            connection.reset()
        else:
            self._session_streams[connection].reset()

    def stop(self) -> None:
        """Go down: refuse connects and reset every connection, until `restart`."""
        self.fault = Fault.REFUSE
        self.kill_connections()

    def restart(self) -> None:
        """Come back up on the same port, serving (`Fault.NONE`); `OSError` if something
        else took the port meanwhile."""
        self.fault = Fault.NONE

    async def push(self, data: bytes | str) -> int:
        """Send ``data`` unasked on every open connection (a message on each ``wss://``
        session); how many it reached."""
        reached = 0
        if self.websocket:
            for session in list(self.sessions):
                try:
                    await session.send_message(data)
                    reached += 1
                except ConnectionClosed:
                    pass
            return reached
        payload = data.encode() if isinstance(data, str) else data
        for stream in list(self._streams):
            try:
                await stream.push(payload)
                reached += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return reached

    async def close_sessions(self, code: int = 1001, reason: str = "restarting") -> None:
        """``wss://``: close every session from the relay's side, with a close frame."""
        for session in list(self.sessions):
            await session.aclose(code, reason)

    # -- serving -------------------------------------------------------------------------

    async def serve(
        self, *, listen: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. With ``listen=False`` only `open_memory_stream` reaches it
        (for tests on a `trio.testing.MockClock`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if listen and self._fault is not Fault.REFUSE:
                    self._listen_again()
                elif not listen and not self.port:
                    self.port = MEMORY_PORT
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._close_listener()
                self._nursery = None

    async def open_memory_stream(self, host: str, port: int) -> trio.abc.Stream:
        """Connect in memory: give this as a pool's ``open_transport``."""
        if self._nursery is None:
            raise RuntimeError("the relay is not serving: start it with open_relay()")
        self.connect_times.append(trio.current_time())
        self.connecting += 1
        self.max_connecting = max(self.max_connecting, self.connecting)
        try:
            await trio.sleep(self.connect_delay)
        finally:
            self.connecting -= 1
        if self._fault is Fault.REFUSE:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        client, server = trio.testing.memory_stream_pair()

        def reset() -> None:
            server.send_stream.close()
            server.receive_stream.close()

        self._nursery.start_soon(self._serve_connection, server, reset)
        return client

    def _listen_again(self) -> None:
        """Listen on 127.0.0.1, on the port of before once there is one."""
        if self._nursery is None or self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._nursery.start_soon(self._accept, self._listener)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            trio.lowlevel.notify_closing(listener.socket)
            listener.socket.close()

    async def _accept(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        while True:
            try:
                tcp = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return  # refusing now (a new listener takes over when that ends)
            except OSError as exc:
                if exc.errno not in _ACCEPT_PAUSE_ERRNOS:
                    raise
                await trio.sleep(0.1)
                continue
            self._nursery.start_soon(
                self._serve_connection, tcp, lambda tcp=tcp: reset_socket(tcp.socket)
            )

    async def _serve_connection(
        self, transport: trio.abc.Stream, reset: Callable[[], None]
    ) -> None:
        self.accepted += 1
        fault = self._fault
        if fault is Fault.RESET_ON_ACCEPT:
            reset()
            return
        if fault is Fault.CLOSE_ON_ACCEPT:
            await trio.aclose_forcefully(transport)
            return
        wire = Wire(transport, reset)
        self._wires.add(wire)
        try:
            if fault is Fault.NO_TLS:
                await self._never_speak_tls(wire)
            else:
                await self._serve_tls(wire)
        finally:
            self._wires.discard(wire)
            await trio.aclose_forcefully(transport)

    async def _never_speak_tls(self, wire: Wire) -> None:
        """Take the ClientHello and never answer; note when the client gives up."""
        try:
            while await wire.receive_some():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client gave up, or kill_connections() reset it
        self.endings["before_tls"] += 1

    async def _serve_tls(self, wire: Wire) -> None:
        tls = trio.SSLStream(wire, self.tls_context, server_side=True)
        stream = RelayStream(self, tls, wire)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.handshaking += 1
            self.max_handshaking = max(self.max_handshaking, self.handshaking)
            try:
                await tls.do_handshake()
            finally:
                self.handshaking -= 1
            self.handshakes += 1
            if self._fault is Fault.DROP_AFTER_HANDSHAKE:
                return  # accepts, then serves nobody
            if self.tickets_after is not None:
                await self._send_tickets_late(tls, wire)
            self._streams.add(stream)
            if self.websocket:
                await self._serve_websocket(stream)
            else:
                await self._run_handler(stream)
            self.endings["close_notify" if stream.saw_eof else "handler_returned"] += 1
        except _CONNECTION_ENDED:
            if wire.was_reset:
                self.endings["reset"] += 1
            elif stream.closed_idle:
                self.endings["idle_close"] += 1
            else:
                self.endings["ragged"] += 1
        finally:
            self.active -= 1
            self._streams.discard(stream)
            await trio.aclose_forcefully(tls)

    async def _run_handler(self, stream: RelayStream) -> None:
        handler: Any = self.handler or echo
        try:
            await handler(stream)
        except BaseExceptionGroup as group:
            # A handler with a nursery of its own (pushes, say) sees the connection end
            # inside a group: that is the connection ending, not a bug in the handler.
            ended, rest = group.split(_CONNECTION_ENDED)
            if rest is not None:
                raise
            assert ended is not None
            raise _leaves(ended)[0] from None

    async def _send_tickets_late(self, tls: trio.SSLStream[Any], wire: Wire) -> None:
        """trio holds a TLS 1.3 server's session tickets back until its first write; send
        them on their own, later, as OpenSSL-based servers do under load."""
        tickets = tls._delayed_outgoing  # noqa: SLF001 - no public way to time the tickets
        if not tickets:
            return
        delay = self.tickets_after
        await trio.sleep(delay() if callable(delay) else (delay or 0.0))
        await wire.send_all(tickets)
        tls._delayed_outgoing = None  # noqa: SLF001

    async def _serve_websocket(self, stream: RelayStream) -> None:
        handler: Any = self.handler or echo_messages
        async with trio.open_nursery() as nursery:  # for the session's reader task
            try:
                stream.upgrading = True
                request = await wrap_server_stream(nursery, stream)
                self.upgrades += 1
                self.request_paths.append(request.path)
                self.request_headers = {
                    name.decode().lower(): value.decode() for name, value in request.headers
                }
                self.offered_subprotocols = tuple(request.proposed_subprotocols)
                if self._fault is Fault.REJECT_UPGRADE:
                    await request.reject(403, body=b"rejected, as the test asked")
                    return
                if self._fault is Fault.HANG_AFTER_HANDSHAKE:
                    await stream.ended.wait()  # read, never answered, until the client goes
                    return
                offered = self.subprotocol in self.offered_subprotocols
                session = await request.accept(subprotocol=self.subprotocol if offered else None)
                stream.upgrading = False  # from here on, faults and latency meet the session
                self.sessions.add(session)
                self._session_streams[session] = stream
                self.max_sessions = max(self.max_sessions, len(self.sessions))
                try:
                    await handler(session)
                except ConnectionClosed as exc:
                    self.close_codes[exc.reason.code if exc.reason else 1006] += 1
                finally:
                    self.sessions.discard(session)
                    del self._session_streams[session]
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await session.aclose()  # (at once if the session is closed already)
            finally:
                # A close of ours (the handler returned, or close_sessions) ends with the
                # client's answer, which the reader task takes: let it, for a while.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT


@asynccontextmanager
async def open_relay(
    handler: Handler | WebSocketHandler | None = None,
    *,
    websocket: bool = False,
    path: str = "/",
    ca: trustme.CA | None = None,
    tls_context: ssl.SSLContext | None = None,
    listen: bool = True,
) -> AsyncIterator[LoopbackRelay]:
    """Run a `LoopbackRelay` for the block; it stops at the end (its connections closed).

    .. code-block:: python

        async with open_relay() as relay, sc.open_pool(
            relay.address, ssl_context=relay.client_context()
        ) as pool:
            relay.fault = Fault.HANG_AFTER_HANDSHAKE
            ...
    """
    relay = LoopbackRelay(handler, websocket=websocket, path=path, ca=ca, tls_context=tls_context)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, relay, listen)
            try:
                yield relay
            except BaseException as exc:
                # Re-raised below, outside the nursery, so it never comes out in a group.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A handler raised: the test sees that exception itself (trio wraps it).
        raise _alone(group) from None
    if body_error is not None:
        raise body_error


def _alone(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception in ``group`` (however nested), or the group if there are more."""
    leaves = _leaves(group)
    return leaves[0] if len(leaves) == 1 else group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves


async def _serve(relay: LoopbackRelay, listen: bool, *, task_status: trio.TaskStatus[None]) -> None:
    await relay.serve(listen=listen, task_status=task_status)
