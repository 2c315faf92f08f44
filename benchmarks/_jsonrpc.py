"""Measurements 13 and 14: JSON-RPC calls through `JsonRpcClient.call`, against the same
calls hand-written on ``pool.connection()`` and against aiorpcx's client on asyncio.

The three clients call the same JSON-RPC 2.0 server (newline-delimited, over the same TLS)
and check every result:

- ``call``: ``await JsonRpcClient(pool).call(method, *params)``;
- ``hand``: the least a user would write on the pool for a correct call: ``json.dumps`` of
  the request with its id, ``send_all`` of it and a newline, ``receive_line``,
  ``json.loads``, the id checked, an error object refused, the result returned;
- ``aiorpcx``: ``session.send_request(method, params)`` on one ``aiorpcx.connect_rs``
  session (aiorpcx's `RPCSession`), on an asyncio event loop in a thread of this process,
  so that its CPU is counted as the others' is (`time.process_time`: every thread).

``call`` and ``hand`` share one pool (and so the very same channels); the ratio of the two
is what the layer costs, its target <= +10%. Two calls: ``echo`` of a 32-byte hash in hex
(64 characters, an Electrum-sized call and reply) and ``blob`` of the same hash, answered
with a 2 KiB string (a transaction in hex, say).

The server is asyncio (an `asyncio.Protocol`, its lowest-overhead API), in a process of its
own pinned to the server's CPU, started by the case and stopped after it: every request
in a read is answered, and the replies leave in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import ssl
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import aiorpcx  # type: ignore[import-untyped]
import trio

from trio_securechannel import SecureChannel, SecureChannelPool, open_pool
from trio_securechannel.jsonrpc import JsonRpcClient

from ._bench import Bench
from ._clients import fill, in_tasks
from ._machine import package_version
from ._measure import Run, Timing, Variant, paired_cpu_difference, paired_ratio, timed
from ._report import Result
from ._tls import HOST, server_context

T = TypeVar("T")

TASKS = 16
#: The layer's target: at most this much more client CPU per call than the hand-written call
#: (and at most as much less throughput: calls/s >= 1 / OVERHEAD). Reported, never a gate.
OVERHEAD = 1.10

#: A 32-byte hash in hex: the size of an Electrum call's argument (a script hash, a txid).
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
#: The ``blob`` reply: 2 KiB of hex (a 1 KiB transaction, say).
BLOB = (bytes(range(256)) * 4).hex()


@dataclass(frozen=True)
class Call:
    """One JSON-RPC call of the measurements, and the result it must get."""

    key: str  # in the variants' names
    method: str
    params: tuple[Any, ...]
    expected: Any
    label: str  # in the rows' titles


ECHO = Call("echo", "echo", (HASH,), [HASH], "echo, a 64-char hex hash each way")
BLOB_CALL = Call("blob", "blob", (HASH,), BLOB, f"blob, a 64-char hash in, {len(BLOB):,} back")
CALLS = (ECHO, BLOB_CALL)


# -- the server (a process of its own) ----------------------------------------------------

_encode = json.JSONEncoder(separators=(",", ":")).encode


def _answer(line: bytes) -> bytes:
    request = json.loads(line)
    method = request["method"]
    if method == "echo":
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": request.get("params", [])}
    elif method == "blob":
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": BLOB}
    else:
        error = {"code": -32601, "message": f"no method {method}"}
        reply = {"jsonrpc": "2.0", "id": request.get("id"), "error": error}
    return (_encode(reply) + "\n").encode()


class _RpcProtocol(asyncio.Protocol):
    """One client's connection: the requests in each read answered in one write."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if lines:
            assert self._transport is not None
            self._transport.write(b"".join([_answer(line) for line in lines if line]))


def serve(server_file: str, cpu: int | None, pipe: Connection, lifetime: float) -> None:
    """Entry point of the server process."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    asyncio.run(_serve(server_context(Path(server_file)), pipe, lifetime))


async def _serve(context: ssl.SSLContext, pipe: Connection, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_RpcProtocol, HOST, 0, ssl=context)
    stop = asyncio.Event()
    # The parent never writes: the pipe turns readable when it closes its end.
    loop.add_reader(pipe.fileno(), stop.set)
    pipe.send(server.sockets[0].getsockname()[1])
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    server.close()


@dataclass(frozen=True)
class Server:
    """The running JSON-RPC server: where it listens, and its process (for its CPU time)."""

    address: tuple[str, int]
    pid: int


@contextlib.contextmanager
def running_server(
    server_file: Path, *, cpu: int | None, lifetime: float = 1800.0
) -> Iterator[Server]:
    """Start the JSON-RPC server process, yield it, stop it (bounded) on exit."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=serve, args=(str(server_file), cpu, theirs, lifetime), name="bench-jsonrpc"
    )
    process.start()
    theirs.close()
    try:
        if not ours.poll(30.0):
            raise RuntimeError("the JSON-RPC benchmark server did not start within 30 s")
        assert process.pid is not None
        yield Server((HOST, ours.recv()), process.pid)
    finally:
        ours.close()
        process.join(10.0)
        if process.is_alive():
            process.terminate()
            process.join(5.0)


# -- the clients ---------------------------------------------------------------------------

_hand_ids = itertools.count(1)


async def hand_call(pool: SecureChannelPool, method: str, params: list[Any]) -> Any:
    """The hand-written call on ``pool.connection()``: what a user would write, no less."""
    request_id = next(_hand_ids)
    line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    async with pool.connection() as channel:
        await channel.send_all(line.encode() + b"\n")
        reply = json.loads(await channel.receive_line())
    if reply.get("id") != request_id:
        raise RuntimeError(f"a reply to {reply.get('id')!r}, not to {request_id}")
    if "error" in reply:
        raise RuntimeError(f"{method} failed: {reply['error']!r}")
    return reply["result"]


async def _first_call(stream: trio.abc.Stream) -> None:
    """A new channel's first call, as the pool fills (TLS 1.3 tickets read with it)."""
    assert isinstance(stream, SecureChannel)
    request = {"jsonrpc": "2.0", "id": 0, "method": "echo", "params": []}
    await stream.send_all(_encode(request).encode() + b"\n")
    json.loads(await stream.receive_line())


class AsyncioThread:
    """An asyncio event loop running in a thread of this process (aiorpcx's client)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="bench-asyncio", daemon=True
        )
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop; wait for it (without holding trio's thread)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self.loop.close()


async def _aiorpcx_calls(session: Any, call: Call, tasks: int, each: int) -> Timing:
    """On the asyncio loop: ``each`` calls in each of ``tasks`` tasks, timed as `timed`."""
    method, params, expected = call.method, list(call.params), call.expected

    async def calls() -> None:
        for _ in range(each):
            if await session.send_request(method, params) != expected:
                raise AssertionError(f"{method}: an unexpected result")

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    if tasks == 1:
        await calls()
    else:
        await asyncio.gather(*[calls() for _ in range(tasks)])
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, tasks * each)


async def _trio_calls(
    tasks: int, each: int, call: Callable[[], Awaitable[Any]], expected: Any
) -> int:
    async def one() -> None:
        if await call() != expected:
            raise AssertionError("an unexpected result")

    if tasks > 1:
        return await in_tasks(tasks, one, each)
    for _ in range(each):
        await one()
    return each


# -- the measurements ----------------------------------------------------------------------


async def jsonrpc_pool_of_1(bench: Bench) -> list[Result]:
    """13: 1 task, pool of 1: client.call vs hand-written vs aiorpcx (1 session)."""
    n = bench.scale.calls_single
    measured = await _measure(bench, tasks=1, each=n)
    return _results(
        "13", "jsonrpc1", "1 task, pool of 1", measured,
        workload=f"{n} sequential calls per repeat, one checkout each",
        peer="1 session, 1 task",
    )  # fmt: skip


async def jsonrpc_pool_of_16(bench: Bench) -> list[Result]:
    """14: 16 tasks, pool of 16: client.call vs hand-written vs aiorpcx (1 session)."""
    each = bench.scale.calls_per_task
    measured = await _measure(bench, tasks=TASKS, each=each)
    return _results(
        "14", "jsonrpc16", f"{TASKS} tasks, pool of {TASKS}", measured,
        workload=f"{each} calls per task per repeat, one checkout each",
        peer=f"1 session, {TASKS} tasks (multiplexed on it)",
    )  # fmt: skip


@dataclass(frozen=True)
class _Measured:
    runs: dict[str, list[Run]]
    #: By variant: the share of its CPU the server was busy, per run (warm-up included).
    server_busy: dict[str, list[float]]


async def _measure(bench: Bench, *, tasks: int, each: int) -> _Measured:
    if bench.server_file is None:
        raise RuntimeError("the JSON-RPC cases need the server's certificate (Bench.server_file)")
    with running_server(bench.server_file, cpu=bench.server_cpu) as server:
        asyncio_thread = AsyncioThread()
        sessions = contextlib.AsyncExitStack()
        try:
            session = await asyncio_thread.run(
                _open_session(sessions, server.address, bench.client_context())
            )
            async with open_pool(
                server.address, ssl_context=bench.client_context(), max_connections=tasks
            ) as pool:
                await fill(pool, tasks, exchange=_first_call)
                client = JsonRpcClient(pool)
                variants: dict[str, Variant] = {}
                for call in CALLS:
                    variants |= _variants(call, client, pool, session, asyncio_thread, tasks, each)
                busy: dict[str, list[float]] = {name: [] for name in variants}
                watched = {
                    name: _watched(variant, server.pid, busy[name])
                    for name, variant in variants.items()
                }
                return _Measured(await bench.compare(watched), busy)
        finally:
            with trio.move_on_after(10.0):
                await asyncio_thread.run(sessions.aclose())
            asyncio_thread.close()


async def _open_session(
    sessions: contextlib.AsyncExitStack, address: tuple[str, int], context: ssl.SSLContext
) -> Any:
    """On the asyncio loop: one aiorpcx session, with a first call done."""
    session = await sessions.enter_async_context(aiorpcx.connect_rs(*address, ssl=context))
    await session.send_request("echo", [])
    return session


def _variants(
    call: Call,
    client: JsonRpcClient,
    pool: SecureChannelPool,
    session: Any,
    asyncio_thread: AsyncioThread,
    tasks: int,
    each: int,
) -> dict[str, Variant]:
    method, params, expected = call.method, call.params, call.expected
    params_list = list(params)

    async def ours_call() -> Any:
        return await client.call(method, *params)

    async def hand_written_call() -> Any:
        return await hand_call(pool, method, params_list)

    async def ours() -> Run:
        return (await timed(lambda: _trio_calls(tasks, each, ours_call, expected))).throughput()

    async def hand() -> Run:
        timing = await timed(lambda: _trio_calls(tasks, each, hand_written_call, expected))
        return timing.throughput()

    async def peer() -> Run:
        timing = await asyncio_thread.run(_aiorpcx_calls(session, call, tasks, each))
        return timing.throughput()

    return {f"call-{call.key}": ours, f"hand-{call.key}": hand, f"aiorpcx-{call.key}": peer}


def _watched(variant: Variant, pid: int, busy: list[float]) -> Variant:
    """``variant``, with the share of its CPU the server used meanwhile added to ``busy``."""

    async def run() -> Run:
        cpu, wall = process_cpu_seconds(pid), time.perf_counter()
        result = await variant()
        wall = time.perf_counter() - wall
        after = process_cpu_seconds(pid)
        if cpu is not None and after is not None:
            busy.append((after - cpu) / wall)
        return result

    return run


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user and system) process ``pid`` has used, to the clock tick (10 ms):
    the server's share is rough in quick mode. None where ``/proc`` cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _results(
    number: str, slug: str, shape: str, measured: _Measured, *, workload: str, peer: str
) -> list[Result]:
    """Per call: client.call against hand-written (the target), and against aiorpcx."""
    runs, results = measured.runs, []
    target = f"<= +{OVERHEAD - 1:.0%} (CPU/call <= {OVERHEAD:g}x, calls/s >= {1 / OVERHEAD:.2f}x)"
    version = package_version("aiorpcx")
    for call in CALLS:
        suffix = "" if call is ECHO else "k"
        names = [f"{side}-{call.key}" for side in ("call", "hand", "aiorpcx")]
        ours, hand, aio = (runs[name] for name in names)
        busy = ", ".join(
            f"{side} {statistics.median(measured.server_busy[name]):.0%}"
            for side, name in zip(("client.call", "hand-written", "aiorpcx"), names, strict=True)
            if measured.server_busy[name]
        )
        server = f"server CPU busy (median): {busy}" if busy else "server CPU not measured"
        cpu_ratio = paired_ratio(ours, hand, cpu=True)
        rate_ratio = paired_ratio(ours, hand)
        title = f"JSON-RPC {call.label}, {shape}: client.call"
        results.append(
            Result(
                number + suffix, slug + ("-2k" if suffix else ""), f"{title} vs hand-written",
                "calls/s", ours, "hand-written call on pool.connection()", hand,
                cpu_ratio, "client CPU", target,
                cpu_ratio <= OVERHEAD and rate_ratio >= 1 / OVERHEAD,
                (f"{workload}; calls/s {rate_ratio:.3g}x the hand-written call's; client.call,"
                 " the hand-written call (same pool, same channels) and aiorpcx take turns in"
                 f" every repeat; {server}",),
                cpu_difference=paired_cpu_difference(ours, hand),
            )
        )  # fmt: skip
        results.append(
            Result(
                f"{number}{suffix}a", f"{slug}{'-2k' if suffix else ''}-aiorpcx",
                f"{title} vs aiorpcx", "calls/s", ours,
                f"aiorpcx {version} RPCSession (asyncio), {peer}", aio,
                paired_ratio(ours, aio, cpu=True), "client CPU", "- (information)", None,
                (f"calls/s {paired_ratio(ours, aio):.3g}x aiorpcx's; aiorpcx's client CPU"
                 " includes its asyncio loop's thread (process time of the whole client)",),
                cpu_difference=paired_cpu_difference(ours, aio),
            )
        )  # fmt: skip
    return results
