"""The pool through real middleboxes on 127.0.0.1: HAProxy passing TLS through, stunnel and
nginx terminating it. Each test is skipped, naming the program, where it is not installed."""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import trio_securechannel as sc
from trio_securechannel.testing import LoopbackRelay

from conftest import SERVER_CERT
from helpers import books, check_out_at_once, echo, wait_until
from middleboxes import (
    EchoBackend,
    Middlebox,
    requires,
    run_haproxy,
    run_nginx_stream,
    run_stunnel,
)

Terminator = Callable[..., AbstractAsyncContextManager[Middlebox]]
TERMINATORS = [
    pytest.param(run_stunnel, id="stunnel", marks=requires("stunnel4")),
    pytest.param(run_nginx_stream, id="nginx", marks=requires("nginx")),
]


@pytest.fixture
async def echo_backend(nursery: trio.Nursery) -> AsyncIterator[EchoBackend]:
    """A plain TCP echo server for the terminators, stopped after the test."""
    backend = EchoBackend()
    await nursery.start(backend.serve)
    yield backend
    await backend.stop()


async def hold_at_once(pool: sc.SecureChannelPool, count: int) -> list[bytes]:
    """``count`` checkouts held at the same time, each echoing its own payload; the replies."""
    replies: list[bytes] = [b""] * count
    all_held = trio.Event()
    held = 0

    async def one(index: int) -> None:
        nonlocal held
        payload = f"payload {index} ".encode() * 1000  # several TLS records each
        async with pool.connection() as channel:
            replies[index] = await echo(channel, payload)
            held += 1
            if held == count:
                assert books(pool)["in_use"] == count
                all_held.set()
            await all_held.wait()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    return replies


def expected(count: int) -> list[bytes]:
    return [f"payload {index} ".encode() * 1000 for index in range(count)]


def assert_books_balance(pool: sc.SecureChannelPool, *, idle: int) -> None:
    connections = books(pool)
    assert connections["in_use"] == 0
    assert connections["opening"] == 0
    assert connections["waiting"] == 0
    assert connections["idle"] == idle
    assert connections["opened_total"] - connections["closed_total"] == idle


@requires("haproxy")
async def test_haproxy_passes_tls_through_to_the_relay(
    relay: LoopbackRelay, client_context: ssl.SSLContext, tmp_path: Path
) -> None:
    async with (
        run_haproxy(relay.target, tmp_path=tmp_path) as haproxy,
        sc.open_pool(haproxy.target, ssl_context=client_context, max_connections=4) as pool,
    ):
        assert await hold_at_once(pool, 4) == expected(4)
        assert await hold_at_once(pool, 4) == expected(4)  # the same four, reused
        assert_books_balance(pool, idle=4)
        assert pool.status()["errors_total"] == 0
    # The relay itself did the four handshakes: HAProxy only carried the bytes.
    assert relay.handshakes == 4
    assert relay.accepted == 4


@pytest.mark.parametrize("terminator", TERMINATORS)
async def test_a_terminator_in_front_of_a_plain_backend(
    terminator: Terminator,
    echo_backend: EchoBackend,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    async with (
        terminator(echo_backend.target, tmp_path=tmp_path, cert=SERVER_CERT) as middlebox,
        sc.open_pool(middlebox.target, ssl_context=client_context, max_connections=4) as pool,
    ):
        assert await hold_at_once(pool, 4) == expected(4)
        # Reused, though each sent its TLS 1.3 session tickets right after its handshake.
        assert await hold_at_once(pool, 4) == expected(4)
        async with pool.connection() as channel:
            assert channel.ssl_stream.version() == "TLSv1.3"
            peer = channel.ssl_stream.getpeercert(binary_form=True)
        assert_books_balance(pool, idle=4)
        assert pool.status()["errors_total"] == 0
    assert peer == ssl.PEM_cert_to_DER_cert(SERVER_CERT.cert_chain_pems[0].bytes().decode())
    assert echo_backend.accepts == 4  # one backend connection per channel, in plain TCP
    assert echo_backend.echoed_bytes == 2 * sum(map(len, expected(4)))


async def first_read(pool: sc.SecureChannelPool) -> bytes | type[Exception]:
    """What a fresh channel's first ``receive_some`` gives: the bytes, or the error raised."""
    try:
        async with pool.connection() as channel:
            return bytes(await channel.receive_some())
    except trio.BrokenResourceError as exc:
        return type(exc)


@pytest.mark.parametrize(
    ("terminator", "observed"),
    [
        # stunnel resets the connection (TCP RST, no close_notify): the channel is broken.
        pytest.param(
            run_stunnel, trio.BrokenResourceError, id="stunnel", marks=requires("stunnel4")
        ),
        # nginx closes it cleanly, with a TLS close_notify: the channel reads end of stream.
        pytest.param(run_nginx_stream, b"", id="nginx", marks=requires("nginx")),
    ],
)
async def test_a_terminator_whose_backend_is_down(
    terminator: Terminator,
    observed: bytes | type[Exception],
    nursery: trio.Nursery,
    echo_backend: EchoBackend,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    await echo_backend.stop()  # refused from now on
    async with (
        terminator(echo_backend.target, tmp_path=tmp_path, cert=SERVER_CERT) as middlebox,
        sc.open_pool(middlebox.target, ssl_context=client_context) as pool,
    ):
        # The handshake with the terminator succeeds, so the checkout does; then the
        # terminator fails to reach its backend and drops the channel.
        with trio.fail_after(5):
            assert await first_read(pool) == observed
        assert_books_balance(pool, idle=0)
        assert books(pool)["opened_total"] == 1
        assert echo_backend.accepts == 0

        # The backend comes back on its port: the same terminator serves again.
        await nursery.start(echo_backend.serve)
        with trio.fail_after(5):
            async with pool.connection() as channel:
                assert await echo(channel, b"back") == b"back"
        assert echo_backend.accepts == 1


@requires("haproxy")
async def test_haproxy_maxconn_holds_a_second_connection_back(
    relay: LoopbackRelay, client_context: ssl.SSLContext, tmp_path: Path
) -> None:
    async def open_tls(port: int) -> trio.SSLStream[trio.SocketStream]:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_context)
        await stream.do_handshake()
        return stream

    async with run_haproxy(relay.target, tmp_path=tmp_path, maxconn=1) as haproxy:
        with trio.fail_after(5):
            first = await open_tls(haproxy.port)
        second: list[trio.SSLStream[trio.SocketStream]] = []

        async def open_second() -> None:
            second.append(await open_tls(haproxy.port))

        async with first, trio.open_nursery() as nursery:
            nursery.start_soon(open_second)
            # The kernel completes the second connection; HAProxy leaves it in the queue.
            await wait_until(lambda: haproxy.queued() == 1)
            await trio.sleep(0.1)  # time enough for HAProxy to take it, were it allowed
            assert second == []
            assert relay.accepted == 1
            assert haproxy.queued() == 1
            with trio.fail_after(5):
                await first.send_all(b"first")
                assert await first.receive_some() == b"first"
            await first.aclose()  # frees the one connection HAProxy allows...
            await wait_until(lambda: bool(second))  # ...and the waiting one goes through
        (stream,) = second
        async with stream:
            with trio.fail_after(5):
                await stream.send_all(b"second")
                assert await stream.receive_some() == b"second"
        assert relay.accepted == 2
        assert haproxy.queued() == 0


@pytest.mark.parametrize("terminator", TERMINATORS)
async def test_a_terminator_with_an_untrusted_certificate(
    terminator: Terminator,
    echo_backend: EchoBackend,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    stranger = trustme.CA().issue_cert("127.0.0.1")  # a certificate from another CA
    async with (
        terminator(echo_backend.target, tmp_path=tmp_path, cert=stranger) as middlebox,
        sc.open_pool(middlebox.target, ssl_context=client_context) as pool,
    ):
        with pytest.raises(sc.ConnectError, match="certificate verify failed") as info:
            async with pool.connection():
                pytest.fail("an untrusted terminator must not yield a channel")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert info.value.phase == "tls"
    assert echo_backend.accepts == 0  # nothing reached the backend


# -- FAULTS rows 28, 30 and 31 against the real thing -----------------------------------------


@requires("haproxy")
async def test_behind_haproxy_maxconn_the_pool_recovers_within_one_cooldown(
    relay: LoopbackRelay, client_context: ssl.SSLContext, tmp_path: Path
) -> None:
    # HAProxy lets 2 connections through; the pool may open 8. A burst fills HAProxy, the
    # rest of the connects time out and open the breaker; the 2 healthy channels then sit
    # idle, holding HAProxy's 2 slots. A trial on a fresh connection could never get in.
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "max_connections": 8,
        "connect_timeout": 0.5,
        "breaker_failure_threshold": 3,
        "breaker_cooldown": 1.0,
    }
    outcomes: list[str] = []

    async def one_of_the_burst() -> None:
        try:
            async with pool.connection() as channel:
                assert await echo(channel, b"burst") == b"burst"
                await trio.sleep(0.8)  # held past the others' connect_timeout
            outcomes.append("served")
        except (sc.ConnectError, sc.CircuitOpen) as exc:
            outcomes.append(type(exc).__name__)

    async with (
        run_haproxy(relay.target, tmp_path=tmp_path, maxconn=2) as haproxy,
        sc.open_pool(haproxy.target, **options) as pool,
    ):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one_of_the_burst)
        assert outcomes.count("served") == 2
        assert pool.breaker_state is sc.BreakerState.OPEN
        assert books(pool)["idle"] == 2
        retry_after = pool.status()["breaker"]["retry_after"]
        assert retry_after is not None
        await trio.sleep(retry_after)  # the cooldown ends
        with trio.fail_after(1.0):  # recovered within one cooldown, not at idle_timeout
            async with pool.connection() as channel:
                assert await echo(channel, b"trial") == b"trial"
        assert pool.status()["breaker"]["state"] == "closed"
        assert books(pool)["opened_total"] == 2  # the trial ran on a healthy idle channel


@pytest.mark.parametrize("terminator", TERMINATORS)
async def test_spares_stay_warm_though_the_terminator_sends_tickets_on_its_own(
    terminator: Terminator,
    echo_backend: EchoBackend,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    async with (
        terminator(echo_backend.target, tmp_path=tmp_path, cert=SERVER_CERT) as middlebox,
        sc.open_pool(middlebox.target, ssl_context=client_context, min_idle=4) as pool,
    ):
        await wait_until(lambda: books(pool)["idle"] == 4)
        await trio.sleep(0.2)  # the tickets have come, unread
        spares = set(pool.channels())
        # Each checkout got a warm spare, none a cold handshake.
        assert await check_out_at_once(pool, 4) == spares
        assert "stale" not in books(pool)["closed_by_reason"]


@pytest.mark.parametrize("terminator", TERMINATORS)
async def test_a_terminator_whose_backend_is_down_is_not_hammered(
    terminator: Terminator,
    echo_backend: EchoBackend,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    await echo_backend.stop()  # the terminator completes TLS, then hangs up
    options: dict[str, Any] = {
        "ssl_context": client_context,
        "min_idle": 5,
        "breaker_failure_threshold": 3,
        "breaker_cooldown": 0.5,
    }
    async with (
        terminator(echo_backend.target, tmp_path=tmp_path, cert=SERVER_CERT) as middlebox,
        sc.open_pool(middlebox.target, **options) as pool,
    ):
        began = trio.current_time()
        await trio.sleep(2.5)
        elapsed = trio.current_time() - began
        status = pool.status()
    # The threshold, the spares opened at once, then one trial per cooldown: never a storm.
    bound = 3 + 5 + math.ceil(elapsed / 0.5)
    assert status["connections"]["opened_total"] <= bound
    assert status["breaker"]["opened_total"] >= 1
    assert set(status["errors_by_kind"]) <= {"dropped", "tcp", "tls"}
