"""`LoopbackRelay`: a TLS relay on 127.0.0.1 (or in memory) whose faults a test switches."""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, final

import trio
import trio.testing
import trustme
from trio_websocket import ConnectionClosed, WebSocketConnection

from ._certificates import MEMORY_HOST, client_context, server_context
from ._faults import Fault
from ._groups import leaves
from ._streams import RelayStream, Wire, reset_socket
from ._websocket import CLOSE_TIMEOUT, WebSocketHandler, echo_messages, serve_session

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

Handler = Callable[[RelayStream], Awaitable[None]]

#: How a connection ends from under its handler: the client left, or the relay cut it.
_CONNECTION_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError)

#: The port in `LoopbackRelay.address` when it serves in memory only.
MEMORY_PORT = 443

#: Accept errors that mean "out of resources for now": wait, then accept again.
_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

#: How long `Fault.CLOSE_ON_ACCEPT` waits for the client to close after our FIN.
_LINGER = 1.0


async def echo(stream: RelayStream) -> None:
    """The default raw-TLS handler: send back what arrives, until the client closes."""
    while data := await stream.receive_some():
        await stream.send_all(data)


@final
class LoopbackRelay:
    """A relay for tests: TLS on 127.0.0.1 with a throwaway CA, or in memory.

    It echoes, or runs ``handler`` on each connection: ``await handler(stream)`` with a
    `RelayStream` over raw TLS, or ``await handler(session)`` with a trio-websocket
    ``WebSocketConnection`` when ``websocket=True``. Set `fault` (a `Fault`), ``latency``,
    ``piece_size``, ``idle_close_after`` or ``tickets_after`` at any time; its counters say
    what reached it. Start it with `open_relay`, or ``await nursery.start(relay.serve)``.

    Args:
        handler: What serves each connection (default: echo).
        websocket: Serve ``wss://`` (WebSocket over the same TLS) at ``path``.
        path: The WebSocket path in `address`.
        ca: The CA that signs its certificate (default: a new throwaway one). Share one
            between relays to share one client context.
        tls_context: A server context of your own instead (give ``ca`` too, if its
            certificate comes from one, for `client_context`).
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
        self._knows_trust = ca is not None or tls_context is None
        self.ca = ca if ca is not None else trustme.CA(organization_name="throwaway test CA")
        self.tls_context = tls_context if tls_context is not None else server_context(self.ca)
        self.host = "127.0.0.1"
        self.port = 0
        self._fault = Fault.NONE
        #: Seconds each reply waits before it is sent (not pushes, not a wss:// upgrade).
        self.latency = 0.0
        #: Send every reply in pieces this many bytes long, each its own TLS record, apart.
        self.piece_size: int | None = None
        self._idle_close_after = float("inf")
        #: Send the TLS 1.3 session tickets this long after the handshake (a callable is
        #: drawn per connection), unless a reply takes them first; None: with the first
        #: reply, as trio does.
        self.tickets_after: float | Callable[[], float] | None = None
        self._push_behind_reply: bytes | None = None
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
        self.active = 0  # connections accepted and not yet ended
        self.max_active = 0
        self.requests = 0  # reads that returned data
        self.bytes_received = 0  # plaintext
        self.bytes_sent = 0  # plaintext, pushes too
        #: How connections ended: "close_notify" (the client closed TLS cleanly), "ragged"
        #: (it went without), "reset" (the relay reset it), "idle_close", "dropped"
        #: (`Fault.DROP_AFTER_HANDSHAKE`), "reset_on_accept", "closed_on_accept",
        #: "refused" (accepted as `stop` began), "before_tls" (`Fault.NO_TLS`),
        #: "handler_returned"; over wss:// also "ws_close" (a close frame, in
        #: `close_codes`), "before_upgrade", "rejected".
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
        self._listens = True
        self._listener: trio.SocketListener | None = None
        self._wires: set[Wire] = set()
        self._streams: set[RelayStream] = set()
        self._session_streams: dict[WebSocketConnection, RelayStream] = {}
        self._changed = trio.Event()

    # -- where clients go ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """Give this to a pool: ``127.0.0.1:PORT``, or ``wss://127.0.0.1:PORT/path``
        (in memory, the host is ``memory.invalid``)."""
        return self.url if self.websocket else f"{self.host}:{self.port}"

    @property
    def target(self) -> tuple[str, int]:
        """The host and port, as a tuple."""
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """The ``wss://`` URL, whether or not the relay serves WebSocket."""
        return f"wss://{self.host}:{self.port}{self.path}"

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this relay's CA, and nothing else."""
        if not self._knows_trust:
            raise ValueError(
                "this relay serves a tls_context of your own: give open_relay() its ca too,"
                " or build the client context yourself"
            )
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
        if self._fault is Fault.REFUSE and fault is not Fault.REFUSE:
            self._listen_again()  # first: if the port is taken, nothing changed
        elif fault is Fault.REFUSE:
            self._close_listener()
        self._fault = fault
        self._notify()

    @property
    def idle_close_after(self) -> float:
        """Close a connection (TLS close_notify) once a read waited this long for a
        request (default: never)."""
        return self._idle_close_after

    @idle_close_after.setter
    def idle_close_after(self, seconds: float) -> None:
        self._idle_close_after = seconds
        self._notify()

    @property
    def push_behind_reply(self) -> bytes | None:
        """Raw TLS: bytes sent unasked right behind each reply, in the same TCP segment,
        as Electrum servers push notifications."""
        return self._push_behind_reply

    @push_behind_reply.setter
    def push_behind_reply(self, data: bytes | None) -> None:
        if data and self.websocket:
            raise ValueError("push_behind_reply is for raw TLS; over wss:// use push()")
        self._push_behind_reply = data

    async def setting_changed(self) -> None:
        """Wait until `fault` or ``idle_close_after`` is set again."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for stream in list(self._streams):
            stream.settings_changed()

    def kill_connections(self) -> None:
        """Reset every open connection at once (RST), as a crashing relay would."""
        for wire in list(self._wires):
            wire.reset()
        self._notify()

    def reset(self, connection: RelayStream | WebSocketConnection) -> None:
        """Reset one connection now (RST): a handler's `RelayStream`, or its ``wss://``
        session (one that ended already is left alone)."""
        if isinstance(connection, RelayStream):
            connection.reset()
        elif connection in self._session_streams:
            self._session_streams[connection].reset()

    def stop(self) -> None:
        """Go down: refuse connects and reset every connection, until `restart`."""
        self.fault = Fault.REFUSE
        self.kill_connections()

    def restart(self) -> None:
        """Come back up on the same port, serving (`Fault.NONE`); `OSError` if something
        else took the port meanwhile (the relay stays down)."""
        self.fault = Fault.NONE

    async def push(self, data: bytes | str) -> int:
        """Send ``data`` unasked on every open connection (a message on each ``wss://``
        session), one after another; how many it reached."""
        await trio.lowlevel.checkpoint()
        reached = 0
        if self.websocket:
            for session in list(self.sessions):
                try:
                    await session.send_message(data)
                    reached += 1
                except (*_CONNECTION_ENDED, ConnectionClosed):
                    pass
            return reached
        payload = data.encode() if isinstance(data, str) else data
        for stream in list(self._streams):
            try:
                await stream.push(payload)
                reached += 1
            except _CONNECTION_ENDED:
                pass
        return reached

    async def close_sessions(self, code: int = 1001, reason: str = "restarting") -> None:
        """``wss://``: close every session from the relay's side, with a close frame; each
        waits up to a second for the client's answer."""
        await trio.lowlevel.checkpoint()

        async def close(session: WebSocketConnection) -> None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await session.aclose(code, reason)

        async with trio.open_nursery() as nursery:
            for session in list(self.sessions):
                nursery.start_soon(close, session)

    def register_session(self, session: WebSocketConnection, stream: RelayStream) -> None:
        self.sessions.add(session)
        self._session_streams[session] = stream
        self.max_sessions = max(self.max_sessions, len(self.sessions))

    def forget_session(self, session: WebSocketConnection) -> None:
        self.sessions.discard(session)
        self._session_streams.pop(session, None)

    # -- serving -------------------------------------------------------------------------

    async def serve(
        self, *, listen: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. With ``listen=False`` only `open_memory_stream` reaches it
        (for tests on a `trio.testing.MockClock`)."""
        self._listens = listen
        if not listen:
            self.host, self.port = MEMORY_HOST, MEMORY_PORT
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if self._fault is not Fault.REFUSE:
                        self._listen_again()
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._close_listener()
        finally:
            self._nursery = None

    async def open_memory_stream(self, host: str, port: int) -> trio.abc.Stream:
        """Connect in memory: give this as a pool's ``open_transport``."""
        if self._nursery is None:
            raise RuntimeError("the relay is not serving: start it with open_relay()")
        nursery = self._nursery
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

        nursery.start_soon(self._serve_connection, server, reset)
        return client

    def _listen_again(self) -> None:
        """Listen on 127.0.0.1, on the port of before once there is one."""
        if self._nursery is None or self._listener is not None or not self._listens:
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
        self._nursery.start_soon(self._accept, self._listener, self._nursery)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            trio.lowlevel.notify_closing(listener.socket)
            listener.socket.close()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                tcp = await listener.accept()
            except _CONNECTION_ENDED:
                return  # refusing now (a new listener takes over when that ends)
            except OSError as exc:
                if exc.errno not in _ACCEPT_PAUSE_ERRNOS:
                    raise
                await trio.sleep(0.1)
                continue
            nursery.start_soon(
                self._serve_connection, tcp, lambda tcp=tcp: reset_socket(tcp.socket)
            )

    async def _serve_connection(
        self, transport: trio.abc.Stream, reset: Callable[[], None]
    ) -> None:
        self.accepted += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        wire = Wire(transport, reset)
        self._wires.add(wire)
        try:
            self.endings[await self._serve_wire(wire)] += 1
        finally:
            self.active -= 1
            self._wires.discard(wire)
            await trio.aclose_forcefully(transport)

    async def _serve_wire(self, wire: Wire) -> str:
        """Serve one accepted connection; how it ended (an `endings` key)."""
        fault = self._fault
        if fault is Fault.REFUSE:  # accepted as the listener closed
            wire.reset()
            return "refused"
        if fault is Fault.RESET_ON_ACCEPT:
            wire.reset()
            return "reset_on_accept"
        if fault is Fault.CLOSE_ON_ACCEPT:
            await _close_with_a_fin(wire.transport)
            return "closed_on_accept"
        if fault is Fault.NO_TLS:
            return await self._never_speak_tls(wire)
        return await self._serve_tls(wire)

    async def _never_speak_tls(self, wire: Wire) -> str:
        """Take the ClientHello and never answer, until the client gives up."""
        try:
            while await wire.receive_some():
                pass
        except _CONNECTION_ENDED:
            pass  # the client gave up, or kill_connections() reset it
        return "before_tls"

    async def _serve_tls(self, wire: Wire) -> str:
        tls = trio.SSLStream(wire, self.tls_context, server_side=True)
        stream = RelayStream(self, tls, wire)
        # Known before its handshake ends (TLS 1.3 clients finish first): pushes wait for it.
        self._streams.add(stream)
        try:
            self.handshaking += 1
            self.max_handshaking = max(self.max_handshaking, self.handshaking)
            try:
                await tls.do_handshake()
            finally:
                self.handshaking -= 1
            self.handshakes += 1
            if self._fault is Fault.DROP_AFTER_HANDSHAKE:
                return "dropped"  # accepts, then serves nobody
            if self.tickets_after is not None:
                self._nursery_or_fail().start_soon(self._send_tickets_late, stream)
            if self.websocket:
                handler: Any = self.handler or echo_messages
                ending = await serve_session(self, stream, handler)
            else:
                await self._run_handler(stream)
                ending = "handler_returned"
        except _CONNECTION_ENDED:
            ending = "ragged"
        finally:
            self._streams.discard(stream)
            await trio.aclose_forcefully(tls)
        if wire.was_reset:
            return "reset"
        if stream.closed_idle:
            return "idle_close"
        if stream.saw_eof and ending == "handler_returned":
            return "close_notify"
        if stream.broken and ending == "handler_returned":
            return "ragged"
        return ending

    def _nursery_or_fail(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the relay is not serving")
        return self._nursery

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
            raise leaves(ended)[0] from None

    async def _send_tickets_late(self, stream: RelayStream) -> None:
        """trio holds a TLS 1.3 server's session tickets back until its first write; send
        them on their own, later, as OpenSSL-based servers do under load (unless a reply
        took them along first)."""
        delay = self.tickets_after
        await trio.sleep(delay() if callable(delay) else (delay or 0.0))
        with contextlib.suppress(*_CONNECTION_ENDED):  # the connection ended meanwhile
            await stream.send_held_tickets()


async def _close_with_a_fin(transport: trio.abc.Stream) -> None:
    """Close with a FIN, not a RST: what the client sent is read first (closing with
    unread bytes makes the kernel reset), for a moment."""
    try:
        if isinstance(transport, trio.abc.HalfCloseableStream):
            await transport.send_eof()
        with trio.move_on_after(_LINGER):
            while await transport.receive_some():
                pass
    except _CONNECTION_ENDED:
        pass
