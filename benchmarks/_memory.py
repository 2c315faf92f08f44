"""Measurements 7 and 9: memory per idle channel (RSS) and histogram memory (tracemalloc).

Case 7 measures each repeat in a fresh process: the allocator keeps what a first batch of
channels freed, so a second batch in the same process would look almost free.
"""

from __future__ import annotations

import gc
import multiprocessing
import random
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path

import trio

from trio_securechannel import open_pool
from trio_securechannel._latency import RotatingHistogram

from ._bench import Bench
from ._clients import close_all, fill, open_raws
from ._measure import Run, compare, paired_ratio
from ._report import Result
from ._tls import client_context

#: Handshakes under way at once while a probe opens its channels.
CONCURRENCY = 50
_WARM_UP_CHANNELS = 8


def rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/status``."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def probe(kind: str, n: int, address: tuple[str, int], ca_file: str, pipe: Connection) -> None:
    """Entry point of a probe process: bytes of RSS per idle channel of ``kind``."""
    pipe.send(trio.run(_probe, kind, n, address, Path(ca_file)))
    pipe.close()


async def _probe(kind: str, n: int, address: tuple[str, int], ca_file: Path) -> float:
    context = client_context(ca_file)
    # Warm up the code paths (imports, first handshakes, the pool's machinery) first.
    await close_all(await open_raws(address, context, _WARM_UP_CHANNELS))
    if kind == "pool":
        async with open_pool(address, ssl_context=context, max_connections=n) as pool:
            await fill(pool, _WARM_UP_CHANNELS)
        async with open_pool(address, ssl_context=context, max_connections=n) as pool:
            gc.collect()
            before = rss_bytes()
            await fill(pool, n, concurrency=CONCURRENCY)
            gc.collect()
            return (rss_bytes() - before) / n
    gc.collect()
    before = rss_bytes()
    streams = await open_raws(address, context, n, concurrency=CONCURRENCY)
    gc.collect()
    per_stream = (rss_bytes() - before) / n
    await close_all(streams)
    return per_stream


def _run_probe(kind: str, n: int, address: tuple[str, int], ca_file: Path) -> float:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe(duplex=False)
    process = context.Process(
        target=probe, args=(kind, n, address, str(ca_file), theirs), name=f"bench-{kind}"
    )
    process.start()
    theirs.close()
    try:
        if not ours.poll(120.0):
            raise RuntimeError(f"the {kind} memory probe gave no answer within 120 s")
        per_channel: float = ours.recv()
        return per_channel
    finally:
        ours.close()
        process.join(30.0)
        if process.is_alive():
            process.terminate()
            process.join(5.0)


async def idle_memory(bench: Bench) -> list[Result]:
    """7: RSS per idle pooled channel vs per idle raw SSLStream."""
    n = bench.scale.idle_channels

    async def measure(kind: str) -> Run:
        per_channel = await trio.to_thread.run_sync(
            _run_probe, kind, n, bench.servers.echo, bench.ca_file
        )
        return Run(per_channel / 1024)

    async def ours() -> Run:
        return await measure("pool")

    async def raw() -> Run:
        return await measure("raw")

    # Each probe warms itself up in its own process: no warm-up run here.
    runs = await compare(
        {"ours": ours, "raw": raw}, repeats=bench.repeats, warmups=0, limit=bench.limit
    )
    ratio = paired_ratio(runs["ours"], runs["raw"])
    return [
        Result(
            "7", "memory", f"memory per idle channel, {n} channels (RSS delta)", "KiB/channel",
            runs["ours"], f"{n} idle raw SSLStreams", runs["raw"],
            ratio, "memory", "<= 1.25x", ratio <= 1.25,
            (f"each repeat in a fresh process (warmed up with {_WARM_UP_CHANNELS} channels);"
             " every channel did one round trip before it went idle"
             + ("" if n >= 1000 else f"; quick mode: {n} channels, not 1,000"),),
        )
    ]  # fmt: skip


def _sample_values() -> list[float]:
    """Latencies spread evenly (in log) from 3 µs to 150 s: every bucket gets some."""
    rng = random.Random(9)
    return [10 ** rng.uniform(-5.5, 2.2) for _ in range(4096)]


def _observe(histogram: RotatingHistogram, values: list[float], n: int) -> None:
    full, rest = divmod(n, len(values))
    for _ in range(full):
        for value in values:
            histogram.observe(value)
    for value in values[:rest]:
        histogram.observe(value)


def _traced_bytes(values: list[float], n: int) -> int:
    """Bytes still allocated, as tracemalloc counts them, by a histogram after ``n`` samples."""
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        histogram = RotatingHistogram(0.0)
        _observe(histogram, values, n)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert histogram.current.count == n
    return after - before


async def histogram_memory(bench: Bench) -> list[Result]:
    """9: a channel's latency histogram after 10**6 observations vs after 10**3."""
    values = _sample_values()
    many, few = bench.scale.observations, 1000

    async def ours() -> Run:
        histogram = RotatingHistogram(0.0)
        cpu = time.process_time()
        _observe(histogram, values, many)  # untraced: the cost of one observation
        cpu_us = (time.process_time() - cpu) / many * 1e6
        await trio.lowlevel.checkpoint()
        return Run(_traced_bytes(values, many), cpu_us)

    async def baseline() -> Run:
        await trio.lowlevel.checkpoint()
        return Run(_traced_bytes(values, few))

    runs = await bench.compare({"ours": ours, "few": baseline})
    ratio = paired_ratio(runs["ours"], runs["few"])
    return [
        Result(
            "9", "histogram", f"histogram memory after {many:,} observations", "bytes",
            runs["ours"], f"after {few:,}", runs["few"],
            ratio, "memory", "flat (<= 1.05x)", ratio <= 1.05,
            ("a channel's RotatingHistogram (round_trips), tracemalloc; CPU µs/op is one"
             " observe(), untraced"
             + ("" if many >= 10**6 else f"; quick mode: {many:,} observations, not 10^6"),),
        )
    ]  # fmt: skip
