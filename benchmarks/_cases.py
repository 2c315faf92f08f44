"""Measurements 1-6: the pool's round trips, checkouts, connects and bulk transfer.

Each compares the pool with what a user would otherwise write with trio alone, against
the same server, in the same run. Cases 1 and 2 measure three variants: the pool, the
minimal legal pool (`MiniPool`: the floor under any pool) and dedicated raw streams.
"""

from __future__ import annotations

import math

from trio_securechannel import SecureChannelPool, open_pool

from ._bench import Bench
from ._clients import (
    BULK_CHUNK,
    MiniPool,
    close_all,
    fill,
    in_tasks,
    on_each,
    open_raw,
    open_raws,
    round_trip,
    send_bulk,
)
from ._measure import Run, Timing, paired_cpu_difference, paired_ratio, timed
from ._report import Result

TASKS = 16


async def pool_of_16(bench: Bench) -> list[Result]:
    """1: 16 tasks on a pool of 16 vs the minimal pool of 16 (and 16 dedicated raw streams)."""
    context, address = bench.client_context(), bench.servers.echo
    each = bench.scale.round_trips_per_task
    raws = await open_raws(address, context, TASKS)
    mini = MiniPool(raws)  # over the raw variant's streams: the two never run at once
    try:
        async with open_pool(address, ssl_context=context, max_connections=TASKS) as pool:
            await fill(pool, TASKS)

            async def checkout_round_trip() -> None:
                async with pool.connection() as channel:
                    await round_trip(channel)

            async def mini_round_trip() -> None:
                async with mini.connection() as stream:
                    await round_trip(stream)

            async def ours() -> Run:
                timing = await timed(lambda: in_tasks(TASKS, checkout_round_trip, each))
                return timing.throughput()

            async def minimal() -> Run:
                return (await timed(lambda: in_tasks(TASKS, mini_round_trip, each))).throughput()

            async def raw() -> Run:
                return (await timed(lambda: on_each(raws, each))).throughput()

            runs = await bench.compare({"ours": ours, "mini": minimal, "raw": raw})
    finally:
        await close_all(raws)
    return _against_floor(
        "1", "pool16", "16 tasks, pool of 16: echo round trips", runs,
        mini_label="trio.Semaphore + deque of 16 raw SSLStreams",
        raw_label="16 dedicated raw SSLStreams",
        workload=f"{each} round trips per task per repeat",
    )  # fmt: skip


async def pool_of_1(bench: Bench) -> list[Result]:
    """2: 1 task on a pool of 1 vs the minimal pool of 1 (and 1 dedicated raw stream)."""
    context, address = bench.client_context(), bench.servers.echo
    n = bench.scale.round_trips_single
    raw_stream = await open_raw(address, context)
    mini = MiniPool([raw_stream])
    try:
        async with open_pool(address, ssl_context=context, max_connections=1) as pool:
            await fill(pool, 1)

            async def ours() -> Run:
                return (await timed(lambda: _pooled_round_trips(pool, n))).throughput()

            async def minimal() -> Run:
                return (await timed(lambda: _mini_round_trips(mini, n))).throughput()

            async def raw() -> Run:
                return (await timed(lambda: on_each([raw_stream], n))).throughput()

            runs = await bench.compare({"ours": ours, "mini": minimal, "raw": raw})
    finally:
        await raw_stream.aclose()
    return _against_floor(
        "2", "pool1", "1 task, pool of 1: echo round trips", runs,
        mini_label="trio.Semaphore + deque of 1 raw SSLStream",
        raw_label="1 dedicated raw SSLStream",
        workload=f"{n} round trips per repeat, one checkout each",
    )  # fmt: skip


#: Cases 1 and 2: the pool against the minimal legal pool (the architecture issue's target).
FLOOR_RATIO = 0.97
FLOOR_EXTRA_CPU_US = 1.0


def _against_floor(
    number: str,
    slug: str,
    title: str,
    runs: dict[str, list[Run]],
    *,
    mini_label: str,
    raw_label: str,
    workload: str,
) -> list[Result]:
    """Three rows: ours vs the minimal pool (the target), ours vs raw, and the floor.

    The floor is the minimal legal pool against dedicated raw streams: what any pool that
    checkpoints on checkout costs. The target is on ours against the minimal pool.
    """
    ours, mini, raw = runs["ours"], runs["mini"], runs["raw"]
    ratio = paired_ratio(ours, mini)
    extra_cpu = paired_cpu_difference(ours, mini)
    target = f">= {FLOOR_RATIO:g}x throughput, <= +{FLOOR_EXTRA_CPU_US:g} µs/op"
    information = "- (information)"
    return [
        Result(
            number, slug, f"{title}, vs the minimal pool", "round trips/s",
            ours, f"minimal pool: {mini_label}", mini,
            ratio, "throughput", target,
            ratio >= FLOOR_RATIO and extra_cpu <= FLOOR_EXTRA_CPU_US,
            (f"{workload}; ours, the minimal pool and the raw streams take turns in every"
             " repeat; the pool's checkout + give-back + channel bookkeeping against"
             " the minimal pool's Semaphore.acquire + deque",),
            cpu_difference=extra_cpu,
        ),
        Result(
            f"{number}r", f"{slug}-raw", f"{title}, vs raw streams (no checkout)",
            "round trips/s", ours, raw_label, raw,
            paired_ratio(ours, raw), "throughput", information, None,
            cpu_difference=paired_cpu_difference(ours, raw),
        ),
        Result(
            f"{number}f", f"{slug}-floor",
            f"floor: the minimal pool ({mini_label}), same round trips", "round trips/s",
            mini, raw_label, raw,
            paired_ratio(mini, raw), "throughput", information, None,
            ("what the minimal legal pool costs over raw streams: one checkpoint per"
             " checkout (trio.Semaphore.acquire), a deque pop and append",),
            cpu_difference=paired_cpu_difference(mini, raw),
        ),
    ]  # fmt: skip


async def _pooled_round_trips(pool: SecureChannelPool, n: int) -> int:
    for _ in range(n):
        async with pool.connection() as channel:
            await round_trip(channel)
    return n


async def _mini_round_trips(mini: MiniPool, n: int) -> int:
    for _ in range(n):
        async with mini.connection() as stream:
            await round_trip(stream)
    return n


async def contention(bench: Bench) -> list[Result]:
    """3: 16 tasks on a pool of 4 vs 16 tasks on a Semaphore + deque of 4 raw streams."""
    context, address = bench.client_context(), bench.servers.echo
    each, size = bench.scale.round_trips_per_task, 4
    raws = await open_raws(address, context, size)
    mini = MiniPool(raws)
    try:
        async with open_pool(
            address, ssl_context=context, max_connections=size, acquire_timeout=math.inf
        ) as pool:
            await fill(pool, size)

            async def ours_work() -> None:
                async with pool.connection() as channel:
                    await round_trip(channel)

            async def mini_work() -> None:
                async with mini.connection() as stream:
                    await round_trip(stream)

            async def ours() -> Run:
                return (await timed(lambda: in_tasks(TASKS, ours_work, each))).throughput()

            async def baseline() -> Run:
                return (await timed(lambda: in_tasks(TASKS, mini_work, each))).throughput()

            runs = await bench.compare({"ours": ours, "mini": baseline})
    finally:
        await close_all(raws)
    ratio = paired_ratio(runs["ours"], runs["mini"])
    return [
        Result(
            "3", "contention", "16 tasks, pool of 4 (contention): echo round trips",
            "round trips/s", runs["ours"], "Semaphore + deque of 4 raw SSLStreams",
            runs["mini"], ratio, "throughput", ">= 0.90x", ratio >= 0.90,
            (f"{each} round trips per task per repeat, each in its own checkout",),
        )
    ]  # fmt: skip


async def checkout(bench: Bench) -> list[Result]:
    """4: checkout + give-back with no I/O vs a minimal Semaphore + deque pool."""
    context, address = bench.client_context(), bench.servers.echo
    n = bench.scale.checkouts
    raws = await open_raws(address, context, 1)
    mini = MiniPool(raws)
    try:
        async with open_pool(address, ssl_context=context, max_connections=1) as pool:
            await fill(pool, 1)

            async def ours_work() -> int:
                for _ in range(n):
                    async with pool.connection():
                        pass
                return n

            async def mini_work() -> int:
                for _ in range(n):
                    async with mini.connection():
                        pass
                return n

            async def ours() -> Run:
                return (await timed(ours_work)).latency()

            async def baseline() -> Run:
                return (await timed(mini_work)).latency()

            runs = await bench.compare({"ours": ours, "mini": baseline})
    finally:
        await close_all(raws)
    ratio = paired_ratio(runs["ours"], runs["mini"])
    return [
        Result(
            "4", "checkout", "checkout + give-back, no I/O", "µs/op",
            runs["ours"], "trio.Semaphore + deque", runs["mini"],
            ratio, "time", "<= 1.5x", ratio <= 1.5,
            (f"{n} checkouts per repeat, 1 task, 1 channel; ours includes the one-poll()"
             " liveness probe",),
        )
    ]  # fmt: skip


async def connect_per_request(bench: Bench) -> list[Result]:
    """5: pooled round trips vs opening TLS, one echo and closing, per request."""
    context, address = bench.client_context(), bench.servers.echo
    pooled_n, connects = bench.scale.round_trips_single, bench.scale.connects
    async with open_pool(address, ssl_context=context, max_connections=1) as pool:
        await fill(pool, 1)

        async def connect_work() -> int:
            for _ in range(connects):
                stream = await open_raw(address, context)
                await round_trip(stream)
                await stream.aclose()
            return connects

        async def ours() -> Run:
            return (await timed(lambda: _pooled_round_trips(pool, pooled_n))).throughput()

        async def baseline() -> Run:
            return (await timed(connect_work)).throughput()

        runs = await bench.compare({"ours": ours, "connect": baseline})
    ratio = paired_ratio(runs["ours"], runs["connect"])
    return [
        Result(
            "5", "connect", "pooled vs connect-per-request (TLS open, echo, close)",
            "requests/s", runs["ours"], "connect per request", runs["connect"],
            ratio, "faster", ">= 15x faster", ratio >= 15,
            (f"{pooled_n} pooled requests / {connects} connects per repeat, 1 task",),
        )
    ]  # fmt: skip


async def bulk(bench: Bench) -> list[Result]:
    """6: MB/s through one channel in 64 KiB writes vs a raw stream, to a sink."""
    context, address = bench.client_context(), bench.servers.sink
    total = bench.scale.bulk_bytes
    raw_stream = await open_raw(address, context)
    try:
        async with open_pool(address, ssl_context=context, max_connections=1) as pool:

            async def ours_work() -> int:
                async with pool.connection() as channel:
                    return await send_bulk(channel, total)

            async def ours() -> Run:
                return _megabytes(await timed(ours_work))

            async def raw() -> Run:
                return _megabytes(await timed(lambda: send_bulk(raw_stream, total)))

            runs = await bench.compare({"ours": ours, "raw": raw})
    finally:
        await raw_stream.aclose()
    ratio = paired_ratio(runs["ours"], runs["raw"])
    return [
        Result(
            "6", "bulk", "bulk throughput, one channel, 64 KiB writes", "MB/s",
            runs["ours"], "raw SSLStream", runs["raw"],
            ratio, "throughput", ">= 0.95x", ratio >= 0.95,
            (f"{total // 2**20} MiB per repeat to a sink that confirms receipt; MB = 10^6"
             " bytes; CPU µs/op is per 64 KiB write",),
        )
    ]  # fmt: skip


def _megabytes(timing: Timing) -> Run:
    return Run(timing.ops * len(BULK_CHUNK) / timing.wall / 1e6, timing.cpu_us)
