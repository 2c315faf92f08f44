"""Lines, not reads: FAULTS.md row 37, over real TLS on 127.0.0.1.

A reply longer than one read (a TLS record holds at most 16 KiB) must reach its caller
whole and alone through `SecureChannel.receive_line`, and a channel goes back to the pool
only at a message boundary: half a line, or a line behind the one read, keeps it out.
"""

from __future__ import annotations

import json
import ssl

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import LoopbackRelay

from helpers import books, echo, wait_until
from jsonrpc_relay import JsonRpcRelay

REPLY_SIZE = 40_000


async def call(pool: sc.SecureChannelPool, line: bytes) -> bytes:
    async with pool.connection() as channel:
        await channel.send_line(line)
        return await channel.receive_line()


def request(method: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": []}).encode()


def closed_by(pool: sc.SecureChannelPool) -> dict[str, int]:
    closed: dict[str, int] = books(pool)["closed_by_reason"]
    return closed


async def test_a_40kb_reply_comes_in_several_reads(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # Why the line API exists: the first read of a long reply holds only part of it.
    async with (
        sc.open_pool(relay.target, ssl_context=client_context) as pool,
        pool.connection() as channel,
    ):
        await channel.send_line(b"x" * REPLY_SIZE)
        first = await channel.receive_some()
        assert len(first) < REPLY_SIZE
        rest = await channel.receive_line()
        assert len(first) + len(rest) == REPLY_SIZE


async def test_every_caller_gets_exactly_its_own_40kb_reply(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The README's old mix-up, provoked: 200 calls with 40 KB replies through one channel.
    mixed_up: list[int] = []

    async def caller(task: int) -> None:
        for call in range(20):
            tag = f"{task:02d}-{call:02d}-".encode()
            line = tag + bytes([65 + (task + call) % 26]) * (REPLY_SIZE - len(tag))
            async with pool.connection() as channel:
                await channel.send_line(line)
                if await channel.receive_line() != line:
                    mixed_up.append(task)

    async with sc.open_pool(
        relay.target, ssl_context=client_context, max_connections=1, acquire_timeout=30
    ) as pool:
        async with trio.open_nursery() as nursery:
            for task in range(10):
                nursery.start_soon(caller, task)
        assert mixed_up == []
        assert books(pool)["opened_total"] == 1  # every give-back was at a boundary
        assert closed_by(pool) == {}


async def test_a_channel_at_a_message_boundary_is_pooled_again(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel:
            await channel.send_line(b"one")
            assert await channel.receive_line() == b"one"
            first = channel
        async with pool.connection() as channel:
            assert channel is first
            await channel.send_line(b"two")
            assert await channel.receive_line() == b"two"


@pytest.mark.parametrize("sent", [b"one\ntwo\n", b"one\ntw"], ids=["a whole line", "half"])
async def test_a_channel_given_back_with_bytes_unread_is_not_pooled(
    relay: LoopbackRelay, client_context: ssl.SSLContext, sent: bytes
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel:
            await channel.send_all(sent)  # two messages, or one and a half, in one record
            assert await channel.receive_line() == b"one"
            assert channel.buffered_bytes == len(sent) - len(b"one\n")
            first = channel
        assert closed_by(pool) == {"unread data": 1}
        assert first.closed
        async with pool.connection() as channel:  # a fresh channel, with nothing behind
            assert channel is not first
            await channel.send_line(b"three")
            assert await channel.receive_line() == b"three"


async def test_receive_some_returns_what_receive_line_read_behind_a_line_first(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel:
            await channel.send_all(b"one\nrest")
            assert await channel.receive_line() == b"one"
            assert not channel.unanswered
            assert channel.has_pending_input()
            assert await channel.receive_some(2) == b"re"
            assert await channel.receive_some() == b"st"
            assert channel.buffered_bytes == 0
        async with pool.connection() as again:
            assert again is channel  # read to the end: at a boundary


async def test_a_line_over_max_line_length_is_refused_and_counted_but_opens_no_breaker(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The limit is ours: a healthy relay's long reply must not lock everyone else out.
    async with sc.open_pool(relay.target, ssl_context=client_context, max_line_length=1024) as pool:
        for _ in range(pool.config.breaker_failure_threshold + 1):
            with pytest.raises(sc.ProtocolError, match="longer than max_line_length=1024"):
                await call(pool, b"x" * 2000)
        threshold = pool.config.breaker_failure_threshold + 1
        assert pool.status()["errors_by_kind"] == {"too_big": threshold}
        assert pool.breaker_state is sc.BreakerState.CLOSED
        assert closed_by(pool) == {"error": threshold}
        assert await call(pool, b"x" * 1024) == b"x" * 1024  # within the limit: fine


async def test_nothing_is_read_as_a_line_after_the_channel_gave_up_on_one(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The tail of a refused line must never come back as a message of its own.
    async with sc.open_pool(relay.target, ssl_context=client_context, max_line_length=100) as pool:
        async with pool.connection() as channel:
            await channel.send_all(b"y" * 200 + b"\nnext\n")
            with pytest.raises(sc.ProtocolError):
                await channel.receive_line()
            with pytest.raises(trio.BrokenResourceError, match="failed before"):
                await channel.receive_line()
            with pytest.raises(trio.BrokenResourceError, match="failed before"):
                await channel.receive_some()
        assert closed_by(pool) == {"error": 1}


async def test_a_second_reader_cannot_take_part_of_a_line_being_put_together(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel, trio.open_nursery() as nursery:
            await channel.send_all(b"half a ")
            lines: list[bytes] = []

            async def read_line() -> None:
                lines.append(await channel.receive_line())

            nursery.start_soon(read_line)
            await wait_until(lambda: channel.buffered_bytes > 0)
            with pytest.raises(trio.BusyResourceError):
                await channel.receive_some()
            with pytest.raises(trio.BusyResourceError):
                await channel.receive_line()
            await channel.send_all(b"line\n")
        assert lines == [b"half a line"]


async def test_a_line_that_never_ends_is_cut_off_at_the_limit(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    # A relay that streams bytes without a newline must not grow our buffer without end.
    endless = JsonRpcRelay()
    await nursery.start(endless.serve_tls)
    async with sc.open_pool(
        endless.target, ssl_context=client_context, max_line_length=100_000
    ) as pool:
        with trio.fail_after(5), pytest.raises(sc.ProtocolError, match="max_line_length"):
            await call(pool, request("endless"))
        assert pool.status()["errors_by_kind"] == {"too_big": 1}
        assert books(pool)["closed_by_reason"] == {"error": 1}


async def test_a_relay_that_hangs_up_mid_line_is_held_responsible(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    rude = JsonRpcRelay()
    await nursery.start(rude.serve_tls)
    async with sc.open_pool(rude.target, ssl_context=client_context) as pool:
        with pytest.raises(trio.BrokenResourceError, match="closed the connection mid-line"):
            await call(pool, request("half_line"))
        assert pool.status()["errors_by_kind"] == {"dropped": 1}
        assert pool.status()["breaker"]["consecutive_failures"] == 1


async def test_send_line_refuses_two_lines_and_text_and_sends_nothing(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        async with pool.connection() as channel:
            with pytest.raises(ValueError, match="contains a newline"):
                await channel.send_line(b"one\ntwo")
            with pytest.raises(ValueError, match="contains a newline"):
                await channel.send_line(memoryview(b"one\ntwo"))
            with pytest.raises(TypeError, match="encode the text first"):
                await channel.send_line("text")  # type: ignore[arg-type]
            assert channel.bytes_sent == 0
            assert await echo(channel, b"still fine") == b"still fine"
        assert closed_by(pool) == {}
