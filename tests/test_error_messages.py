"""What the errors say, provoked for real over loopback: each names the relay once, says
what happened in plain words, and keeps the underlying error as its cause."""

from __future__ import annotations

import errno
import os
import re
import ssl
import warnings
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import LoopbackRelay

from conftest import make_server_context
from helpers import closed_port, echo

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    """Serve ``handler`` on a port of 127.0.0.1 for the test; return the port."""
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


def named_once(message: str, port: int) -> bool:
    return message.count("127.0.0.1") == 1 and message.count(str(port)) == 1


# -- connect: the address once, and why ----------------------------------------------------


async def test_a_refused_connect_names_the_relay_once_and_says_refused(
    client_context: ssl.SSLContext,
) -> None:
    port = closed_port()
    async with sc.open_pool(("127.0.0.1", port), ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pass
    error = info.value
    refused = os.strerror(errno.ECONNREFUSED)  # "Connection refused"
    assert str(error) == (
        f"cannot open a secure channel to 127.0.0.1:{port}: TCP connect failed: {refused}"
    )
    assert named_once(str(error), port)
    assert error.phase == "tcp"
    assert isinstance(error.__cause__, OSError)  # trio's, with each address's error behind it


# -- TLS: a relay that offers no version we accept -----------------------------------------


async def refuse_with_an_alert(server_context: ssl.SSLContext, tcp: trio.SocketStream) -> None:
    """Handshake as OpenSSL servers (nginx, ``openssl s_server``) do: a ClientHello with
    no version the server supports gets a protocol_version alert before the hang-up.
    (trio's own server side hangs up without sending its alert.)"""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = server_context.wrap_bio(incoming, outgoing, server_side=True)
    async with tcp:
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    await tcp.send_all(outgoing.read())
                data = await tcp.receive_some()
                if not data:
                    return
                incoming.write(data)
            except ssl.SSLError:  # UNSUPPORTED_PROTOCOL
                await tcp.send_all(outgoing.read())  # the alert
                return
            else:
                raise AssertionError("the handshake was meant to fail")


def tls_1_1_at_most() -> ssl.SSLContext:
    context = make_server_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # rightly: that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 has no TLS 1.1 ciphers above it
    return context


def tls_1_2_at_most() -> ssl.SSLContext:
    context = make_server_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@pytest.mark.parametrize(
    ("relay_context", "client_minimum", "words"),
    [
        pytest.param(
            tls_1_1_at_most,
            None,
            "the relay offers no TLS 1.2 or 1.3 (older versions are refused as insecure)",
            id="tls1.1-relay",
            marks=pytest.mark.skipif(not ssl.HAS_TLSv1_1, reason="no TLS 1.1 in this OpenSSL"),
        ),
        pytest.param(
            tls_1_2_at_most,
            ssl.TLSVersion.TLSv1_3,
            "the relay offers no TLS 1.3, the only version ssl_context accepts",
            id="tls1.3-client-tls1.2-relay",
        ),
    ],
)
async def test_a_tls_version_refusal_says_which_versions_the_relay_lacks(
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
    relay_context: Callable[[], ssl.SSLContext],
    client_minimum: ssl.TLSVersion | None,
    words: str,
) -> None:
    port = await serve(nursery, partial(refuse_with_an_alert, relay_context()))
    if client_minimum is not None:
        client_context.minimum_version = client_minimum
    async with sc.open_pool(("127.0.0.1", port), ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pass
    error = info.value
    assert str(error) == (
        f"cannot open a secure channel to 127.0.0.1:{port}: TLS handshake failed: {words}"
    )
    assert named_once(str(error), port)
    assert error.phase == "tls"
    assert isinstance(error.__cause__, ssl.SSLError)
    assert error.__cause__.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # OpenSSL's own words


# -- a lent channel that breaks: trio's bare BrokenResourceError gets words ----------------


async def ask(pool: sc.SecureChannelPool, request: bytes, replies: list[bytes]) -> None:
    """Send ``request`` on a channel from the pool and read, into ``replies``, until the
    relay ends the stream (or it breaks)."""
    async with pool.connection() as channel:
        await channel.send_all(request)
        while data := await channel.receive_some():
            replies.append(bytes(data))


async def send_until_broken(channel: sc.SecureChannel) -> None:
    for _ in range(100):  # until the relay's reset has arrived
        await channel.send_all(b"more")
        await trio.sleep(0.01)


async def garble_the_reply(tcp: trio.SocketStream) -> None:
    """Answer the first request with an application-data record that fails its MAC."""
    tls = trio.SSLStream(tcp, make_server_context(), server_side=True)
    try:
        await tls.receive_some()
        await tcp.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))
        await tls.receive_some()  # until the client hangs up
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(tls)


async def hang_up_mid_reply(tcp: trio.SocketStream) -> None:
    """Send three bytes of the reply, then close TCP without a TLS close_notify."""
    tls = trio.SSLStream(tcp, make_server_context(), server_side=True)
    try:
        request = await tls.receive_some()
        await tls.send_all(request[:3])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await tcp.aclose()


async def test_a_tls_error_on_a_lent_channel_says_so_and_names_the_relay(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    port = await serve(nursery, garble_the_reply)
    async with sc.open_pool(("127.0.0.1", port), ssl_context=client_context) as pool:
        with pytest.raises(trio.BrokenResourceError) as info:
            await ask(pool, b"hello\n", [])
        assert pool.status()["errors_by_kind"] == {"io": 1}
    message = str(info.value)
    assert re.fullmatch(rf"TLS error on the channel to 127\.0\.0\.1:{port}: [a-z0-9 ]+", message)
    assert "bad record mac" in message  # DECRYPTION_FAILED_OR_BAD_RECORD_MAC, in words
    assert named_once(message, port)
    assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_a_hang_up_without_close_notify_mid_reply_says_so(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    port = await serve(nursery, hang_up_mid_reply)
    replies: list[bytes] = []
    async with sc.open_pool(("127.0.0.1", port), ssl_context=client_context) as pool:
        with pytest.raises(trio.BrokenResourceError) as info:
            await ask(pool, b"hello\n", replies)
    assert replies == [b"hel"]
    message = str(info.value)
    assert message == (
        f"127.0.0.1:{port} closed the connection without ending TLS (no close_notify):"
        " what it sent last may be cut short"
    )
    assert named_once(message, port)
    assert isinstance(info.value.__cause__, ssl.SSLEOFError)


async def test_a_call_after_a_failure_says_the_channel_failed_before(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with (
        sc.open_pool(relay.target, ssl_context=client_context) as pool,
        pool.connection() as channel,
    ):
        assert await echo(channel, b"one") == b"one"
        relay.kill_connections()  # a TCP reset
        with pytest.raises(trio.BrokenResourceError) as first:
            await send_until_broken(channel)
        assert str(first.value)  # the socket's own words ("connection reset ...")
        with pytest.raises(trio.BrokenResourceError) as after:
            await channel.receive_some()  # trio's TLS stream: broken, and says nothing
        with pytest.raises(trio.BrokenResourceError) as again:
            await channel.send_all(b"three")
    for info in (after, again):
        assert str(info.value) == f"this channel to 127.0.0.1:{relay.port} failed before"
        assert named_once(str(info.value), relay.port)
