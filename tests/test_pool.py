"""The pool against a real TLS relay on 127.0.0.1: FAULTS.md rows 1-7, 10-13, 16."""

from __future__ import annotations

import datetime
import json
import os
import random
import socket
import ssl
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trustme

import trio_securechannel as sc
from trio_securechannel import Endpoint, PoolConfig
from trio_securechannel._connect import open_channel
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import CA, make_server_context, new_relay
from helpers import (
    assert_all_slots_free,
    books,
    check_out_at_once,
    closed_port,
    echo,
    relay_of,
    wait_until,
)


async def test_round_trip_and_reuse(relay: LoopbackRelay, client_context: ssl.SSLContext) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        assert not pool.healthy  # nothing established yet
        for _ in range(3):
            async with pool.connection() as channel:
                assert (
                    await echo(channel, b"Bitcoin transaction data") == b"Bitcoin transaction data"
                )
                assert channel.ssl_stream.version() in ("TLSv1.2", "TLSv1.3")
                assert pool.healthy
        status = pool.status()
    assert status["connections"]["opened_total"] == 1  # reused, not reopened
    assert relay.handshakes == 1
    assert status["connections"]["idle"] == 1
    assert status["errors_total"] == 0


async def test_status_is_json_serialisable(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with (
        sc.open_pool(relay.target, ssl_context=client_context) as pool,
        pool.connection(),
    ):
        snapshot = json.loads(json.dumps(pool.status()))
    assert snapshot["target"] == f"127.0.0.1:{relay.port}"
    assert snapshot["connections"]["in_use"] == 1
    assert snapshot["breaker"]["state"] == "closed"


# -- row 1: refused, DNS failure -------------------------------------------------------------


async def test_connection_refused_names_the_endpoint(client_context: ssl.SSLContext) -> None:
    port = closed_port()
    async with sc.open_pool(("127.0.0.1", port), ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pytest.fail("a refused connection must not yield a channel")
        assert f"127.0.0.1:{port}" in str(info.value)
        assert info.value.phase == "tcp"
        assert isinstance(info.value.__cause__, OSError)
        assert books(pool)["opening"] == 0
        assert pool.status()["errors_total"] == 1
        assert pool.status()["errors_by_kind"] == {"tcp": 1}


class _FailingResolver(trio.abc.HostnameResolver):
    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        await trio.lowlevel.checkpoint()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


async def test_dns_failure_is_a_connect_error(client_context: ssl.SSLContext) -> None:
    previous = trio.socket.set_custom_hostname_resolver(_FailingResolver())
    try:
        async with sc.open_pool("no-such-relay.test:50002", ssl_context=client_context) as pool:
            with pytest.raises(sc.ConnectError, match=r"no-such-relay\.test:50002") as info:
                async with pool.connection():
                    pass
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert isinstance(info.value.__cause__, socket.gaierror)
    assert books(pool)["opening"] == 0


# -- rows 2, 3: a peer that never speaks TLS, or hangs up mid-handshake -----------------------


async def test_silent_peer_times_out(relay: LoopbackRelay, client_context: ssl.SSLContext) -> None:
    relay.fault = Fault.NO_TLS
    async with sc.open_pool(relay.target, ssl_context=client_context, connect_timeout=0.3) as pool:
        started = trio.current_time()
        with pytest.raises(sc.ConnectError, match=r"connect_timeout=0\.3s") as info:
            async with pool.connection():
                pass
        assert trio.current_time() - started >= 0.3
        assert info.value.phase == "timeout"
        assert books(pool)["opening"] == 0
        assert pool.status()["errors_by_kind"] == {"timeout": 1}
        await wait_until(lambda: relay.endings["before_tls"] == 1)  # the relay sees it closed
        relay.fault = Fault.NONE
        await assert_all_slots_free(pool)


async def test_peer_hangs_up_during_handshake(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.fault = Fault.CLOSE_ON_ACCEPT
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pass
        assert info.value.phase == "tls"
        assert info.value.__cause__ is not None
        assert pool.status()["errors_total"] == 1
        relay.fault = Fault.NONE
        await assert_all_slots_free(pool)


# -- row 4: certificate problems fail closed --------------------------------------------------


def _relay_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


_OTHER_CA = trustme.CA()
_YESTERDAY = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)


@pytest.mark.parametrize(
    ("server_cert", "verify_words"),
    [
        (_OTHER_CA.issue_cert("127.0.0.1"), "unable to get local issuer certificate"),
        (CA.issue_cert("relay.other.test"), "IP address mismatch"),
        (
            CA.issue_cert(
                "127.0.0.1",
                not_before=_YESTERDAY - datetime.timedelta(days=2),
                not_after=_YESTERDAY,
            ),
            "certificate has expired",
        ),
    ],
    ids=["untrusted-ca", "wrong-hostname", "expired"],
)
async def test_bad_certificates_fail_closed(
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
    server_cert: trustme.LeafCert,
    verify_words: str,
) -> None:
    relay = LoopbackRelay(tls_context=_relay_context(server_cert))
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError, match=verify_words) as info:
            async with pool.connection():
                pass
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert info.value.phase == "tls"
    assert relay.handshakes == 0
    relay.stop()


async def test_empty_root_store_fails_closed(
    relay: LoopbackRelay, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    context = sc.load_root_store(empty)
    async with sc.open_pool(relay.target, ssl_context=context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pass
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert relay.handshakes == 0


async def test_default_context_uses_system_roots_and_fails_closed(relay: LoopbackRelay) -> None:
    # No ssl_context: the system's roots, which do not include this test's throwaway CA.
    async with sc.open_pool(relay.target) as pool:
        assert pool.ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert pool.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
        with pytest.raises(sc.ConnectError, match="certificate verify failed") as info:
            async with pool.connection():
                pass
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert relay.handshakes == 0


async def test_server_name_is_checked_for_dns_names(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    # The relay's certificate names relay.test; reaching it as "localhost" must fail, as
    # "relay.test" (resolved to 127.0.0.1 by a custom opener) must succeed.
    relay = new_relay()
    await nursery.start(relay.serve)

    async def to_relay(host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", relay.port)

    options: dict[str, Any] = {"ssl_context": client_context, "open_transport": to_relay}
    async with (
        sc.open_pool(("relay.test", relay.port), **options) as pool,
        pool.connection() as channel,
    ):
        assert await echo(channel, b"sni") == b"sni"
    async with sc.open_pool(("wrong.test", relay.port), **options) as pool:
        with pytest.raises(sc.ConnectError, match="Hostname mismatch"):
            async with pool.connection():
                pass
    relay.stop()


# -- row 5: never below TLS 1.2 ---------------------------------------------------------------


async def test_tls_1_1_only_server_is_refused(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    context = make_server_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated, rightly
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    relay = LoopbackRelay(tls_context=context)
    await nursery.start(relay.serve)
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pass
    assert info.value.phase == "tls"
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert relay.handshakes == 0
    relay.stop()


# -- row 6: the relay closed an idle pooled channel -------------------------------------------


@pytest.mark.parametrize("how", ["reset", "tls-close"])
async def test_dead_idle_channel_is_replaced_at_checkout(
    relay: LoopbackRelay, client_context: ssl.SSLContext, how: str
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context, cleanup_interval=60) as pool:
        async with pool.connection() as channel:
            assert await echo(channel, b"one") == b"one"
        if how == "reset":
            relay.kill_connections()
        else:
            relay.idle_close_after = 0.0
            relay.kill_connections()  # the handler waiting with no timeout is replaced...
            relay.idle_close_after = 0.05  # ...by fresh ones with an idle timeout
        await trio.sleep(0.1)  # the relay's goodbye reaches our socket
        async with pool.connection() as channel:
            assert await echo(channel, b"two") == b"two"
        status = pool.status()
    assert status["connections"]["opened_total"] == 2
    assert status["connections"]["closed_by_reason"] == {"stale": 1}
    assert status["errors_total"] == 0  # a stale idle channel is not an error


async def test_relay_idle_timeout_detected_by_cleanup_pass(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.idle_close_after = 0.05
    options: dict[str, Any] = {"ssl_context": client_context, "cleanup_interval": 0.1}
    async with sc.open_pool(relay.target, **options) as pool:
        async with pool.connection() as channel:
            assert await echo(channel, b"one") == b"one"
        assert pool.healthy
        await wait_until(lambda: books(pool)["idle"] == 0)
        assert books(pool)["closed_by_reason"] == {"stale": 1}
        assert relay.endings["idle_close"] == 1
        assert not pool.healthy  # the pool emptied: the flag resets


async def test_session_tickets_do_not_make_a_channel_look_stale(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # OpenSSL-based relays send TLS 1.3 session tickets after the handshake. Nobody reads
    # an idle channel, so at checkout they wait on its socket: TLS housekeeping, not a
    # message, and the channel is lent.
    relay.tickets_after = 0.0
    channel = await open_channel(
        Endpoint(*relay.target), client_context, PoolConfig(connect_timeout=5.0)
    )
    assert isinstance(channel, sc.SecureChannel)
    try:
        assert channel.ssl_stream.version() == "TLSv1.3"
        fd = channel.ssl_stream.transport_stream.socket.fileno()
        await trio.lowlevel.wait_readable(fd)  # the tickets came, unread
        assert channel.has_pending_input()  # something waits ...
        assert channel.settle()  # ... but only TLS's own: read, and the channel is quiet
        assert not channel.has_pending_input()
        assert channel.reusable
        assert await echo(channel, b"after the tickets") == b"after the tickets"
    finally:
        await channel.aclose()


@pytest.mark.parametrize(
    ("tickets_after", "waiting_at_checkout"),
    [(lambda: random.uniform(0.03, 0.05), False), (lambda: 0.2, True)],
    ids=["30-50ms, while a spare is watched", "200ms, once spares are pooled"],
)
async def test_late_session_tickets_keep_spares_warm(
    relay: LoopbackRelay,
    client_context: ssl.SSLContext,
    tickets_after: Callable[[], float],
    waiting_at_checkout: bool,
) -> None:
    relay.tickets_after = tickets_after
    async with sc.open_pool(relay.target, ssl_context=client_context, min_idle=4) as pool:
        await wait_until(lambda: books(pool)["idle"] == 4)
        await trio.sleep(0.25)  # every relay's tickets have come by now
        spares = set(pool.channels())
        if waiting_at_checkout:  # unread on each spare: the checkout must settle them
            assert all(spare.has_pending_input() for spare in spares)
        # The four spares were lent, warm, as promised: no cold handshake at checkout.
        assert await check_out_at_once(pool, 4) == spares
        assert "stale" not in books(pool)["closed_by_reason"]


async def test_block_ending_on_a_send_is_not_pooled(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.latency = 0.1  # the reply is still on its way when the block ends
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as first:
            assert await echo(first, b"read") == b"read"
            await first.send_all(b"left unread")
        assert first.closed  # its reply would have reached the next user
        async with pool.connection() as second:
            assert second is not first
            assert await echo(second, b"fresh") == b"fresh"
        assert books(pool)["closed_by_reason"] == {"unanswered": 1}


async def test_data_pushed_onto_an_idle_channel_is_detected(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as first:
            assert await echo(first, b"request") == b"request"
        await relay.push(b'{"method": "blockchain.headers.subscribe", "params": []}\n')
        await wait_until(first.has_pending_input)
        async with pool.connection() as second:
            assert second is not first
            assert await echo(second, b"mine") == b"mine"  # not the pushed notification
        assert books(pool)["closed_by_reason"] == {"stale": 1}


async def test_channel_closed_by_a_user_who_kept_it_is_not_lent(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"ssl_context": client_context, "cleanup_interval": 0.05}
    async with sc.open_pool(relay.target, **options) as pool:
        for how in ("checkout", "cleanup pass"):
            async with pool.connection() as kept:
                assert await echo(kept, b"x") == b"x"
            await kept.aclose()  # misuse: the channel belongs to the pool again
            if how == "checkout":
                async with pool.connection() as channel:
                    assert channel is not kept
                    assert await echo(channel, b"y") == b"y"
            else:
                await wait_until(lambda: books(pool)["idle"] == 0)
        assert books(pool)["closed_by_reason"] == {"closed": 2}


# -- row 7: reset while checked out -----------------------------------------------------------


async def test_reset_while_checked_out(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context, max_connections=2) as pool:

        async def use_through_a_reset() -> None:
            async with pool.connection() as channel:
                assert await echo(channel, b"before") == b"before"
                relay.kill_connections()
                with pytest.raises(trio.BrokenResourceError):
                    await channel.receive_some()
                assert channel.errors == {"io": 1}
                with pytest.raises(trio.BrokenResourceError):  # still broken, still one error
                    await channel.send_all(b"again")
                assert pool.status()["errors_total"] == 1  # visible while still checked out
                await channel.receive_some()  # the caller lets it propagate

        with pytest.raises(trio.BrokenResourceError):
            await use_through_a_reset()
        status = pool.status()
        assert status["errors_total"] == 1
        assert status["errors_by_kind"] == {"io": 1}
        assert status["connections"]["closed_by_reason"] == {"error": 1}
        await assert_all_slots_free(pool)
        assert pool.status()["errors_total"] == 1


# -- rows 11-13: the block's own exceptions, exhaustion, FIFO waits ---------------------------


class AppError(Exception):
    pass


async def test_app_exception_comes_out_bare_and_channel_is_dropped(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        lent: list[sc.SecureChannel] = []

        async def fail_mid_message() -> None:
            async with pool.connection() as channel:
                lent.append(channel)
                await channel.send_all(b"half a mess")
                raise AppError("boom")

        with pytest.raises(AppError) as info:
            await fail_mid_message()
        assert type(info.value) is AppError  # not an ExceptionGroup
        channel = lent[0]
        assert channel.closed
        assert books(pool)["closed_by_reason"] == {"aborted": 1}
        async with pool.connection() as second:
            assert second is not channel
            assert await echo(second, b"clean") == b"clean"
        assert pool.status()["errors_total"] == 0  # the application's error is not ours


async def test_exception_in_pool_body_comes_out_bare(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    with pytest.raises(AppError):
        async with sc.open_pool(relay.target, ssl_context=client_context, min_idle=2):
            raise AppError("from the pool body")


async def test_cancel_inside_block_discards_channel(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    relay.latency = 10
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with trio.move_on_after(0.1) as scope:
            async with pool.connection() as channel:
                await channel.send_all(b"slow")
                await channel.receive_some()
        assert scope.cancelled_caught
        assert channel.closed
        assert books(pool)["closed_by_reason"] == {"aborted": 1}
        relay.latency = 0
        await assert_all_slots_free(pool)


async def test_exhausted_at_once_with_zero_acquire_timeout(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context, max_connections=2) as pool:
        async with pool.connection(), pool.connection():
            with pytest.raises(sc.PoolExhausted, match="Connection pool exhausted") as info:
                async with pool.connection():
                    pass
            assert info.value.max_connections == 2
            assert books(pool)["in_use"] == 2
        assert pool.status()["pool_exhausted_total"] == 1
        await assert_all_slots_free(pool)


async def test_waiters_are_served_fifo_then_time_out(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"max_connections": 1, "acquire_timeout": 5.0}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        order: list[int] = []

        async def wait_then_use(n: int) -> None:
            async with pool.connection() as channel:
                order.append(n)
                assert await echo(channel, b"%d" % n) == b"%d" % n

        release = trio.Event()

        async def hold(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with pool.connection():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold)
            for n in range(5):
                nursery.start_soon(wait_then_use, n)
                await trio.testing.wait_all_tasks_blocked()
            assert books(pool)["waiting"] == 5
            release.set()  # the holder leaves; the line moves in order
        assert order == [0, 1, 2, 3, 4]
        assert books(pool)["opened_total"] == 1  # one channel, handed from task to task

    short: dict[str, Any] = {"max_connections": 1, "acquire_timeout": 0.2}
    async with sc.open_pool(relay.target, ssl_context=client_context, **short) as pool:
        async with pool.connection():
            started = trio.current_time()
            with pytest.raises(sc.PoolExhausted, match=r"waited 0\.2s"):
                async with pool.connection():
                    pass
            assert trio.current_time() - started >= 0.2
            assert books(pool)["waiting"] == 0
        assert pool.status()["pool_exhausted_total"] == 1


# -- row 16: 1000 tasks on 50 connections -----------------------------------------------------


async def test_thousand_tasks_on_fifty_channels(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: dict[str, Any] = {"max_connections": 50, "acquire_timeout": 60.0}
    rng = random.Random(1000)
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        peak = 0

        async def worker(n: int) -> None:
            nonlocal peak
            payload = rng.randbytes(rng.randrange(1, 4096)) + b"#%d" % n
            async with pool.connection() as channel:
                peak = max(peak, books(pool)["in_use"] + books(pool)["opening"])
                assert await echo(channel, payload) == payload

        async with trio.open_nursery() as nursery:
            for n in range(1000):
                nursery.start_soon(worker, n)
        status = pool.status()
    assert peak <= 50
    assert relay.max_active <= 50
    assert status["connections"]["opened_total"] <= 50
    assert status["connections"]["in_use"] == 0
    assert status["errors_total"] == 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_no_socket_left_open(relay: LoopbackRelay, client_context: ssl.SSLContext) -> None:
    before = _open_fds()
    async with (
        sc.open_pool(relay.target, ssl_context=client_context, max_connections=8) as pool,
        trio.open_nursery() as nursery,
    ):
        for _ in range(8):
            nursery.start_soon(_one_round_trip, pool)
    await wait_until(lambda: relay.active == 0)
    assert _open_fds() == before


async def _one_round_trip(pool: sc.SecureChannelPool) -> None:
    async with pool.connection() as channel:
        assert await echo(channel, b"x") == b"x"


async def test_full_duplex_use_measures_sane_round_trips(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # One task sends while another receives, as trio.abc.Stream allows (pipelining).
    options: dict[str, Any] = {"ssl_context": client_context, "max_latency_ms": 1000}
    async with sc.open_pool(relay.target, **options) as pool:
        async with pool.connection() as channel:
            payload = b"x" * 1000

            async def send_all_of_it() -> None:
                for _ in range(200):
                    await channel.send_all(payload)

            async def receive_all_of_it() -> None:
                received = 0
                while received < 200 * len(payload):
                    received += len(await channel.receive_some())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_of_it)
                nursery.start_soon(receive_all_of_it)
        recent = channel.recent_round_trip()
        assert recent is not None
        assert recent < 1.0
        slowest = channel.round_trips.recent().quantile(1.0)
        assert slowest is not None
        assert slowest < 5.0
        relay_of(pool).clean()
        assert not channel.closed  # not mistaken for a slow channel


async def test_channel_whose_socket_was_closed_under_it_is_not_lent(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as first:
            assert await echo(first, b"one") == b"one"
            await first.ssl_stream.transport_stream.aclose()  # behind the channel's back
        reuse = socket.socketpair()  # likely takes over the freed file descriptor
        try:
            async with pool.connection() as second:
                assert second is not first
                assert await echo(second, b"two") == b"two"
        finally:
            for sock in reuse:
                sock.close()
        assert books(pool)["closed_by_reason"] == {"stale": 1}
