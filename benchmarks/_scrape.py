"""Measurement 8: how long a ``/metrics`` scrape takes, with 50 channels after many round trips.

Timed twice: `SecureChannelPool.metrics_text` (collecting and rendering), and a whole scrape
over HTTP from the pool's own metrics server (hypercorn in this same process).
"""

from __future__ import annotations

import math
import re

import trio

from trio_securechannel import SecureChannelPool, open_pool

from ._bench import Bench
from ._clients import fill, in_tasks, round_trip
from ._http import get_close
from ._measure import Run, Timing, spread, timed
from ._report import Result

CHANNELS = 50
TARGET_MS = 10.0


def _per_scrape(timing: Timing) -> Run:
    return Run(timing.wall / timing.ops * 1e3, timing.cpu_us)


def _round_trip_count(text: bytes, namespace: str) -> int:
    match = re.search(rb"^" + namespace.encode() + rb"_round_trip_seconds_count (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else -1


async def scrape(bench: Bench) -> list[Result]:
    """8: scrape time of ``/metrics`` with 50 channels after 10**5 round trips."""
    address = bench.servers.echo
    total, scrapes = bench.scale.scrape_round_trips, bench.scale.scrapes
    each = math.ceil(total / CHANNELS)
    async with open_pool(
        address,
        ssl_context=bench.client_context(),
        max_connections=CHANNELS,
        acquire_timeout=math.inf,
        metrics_port=0,
    ) as pool:
        await fill(pool, CHANNELS)

        async def checkout_round_trip() -> None:
            async with pool.connection() as channel:
                await round_trip(channel)

        load = await timed(lambda: in_tasks(CHANNELS, checkout_round_trip, each))
        metrics_address = pool.metrics_address
        assert metrics_address is not None
        text = pool.metrics_text()

        async def render() -> Run:
            return _per_scrape(await timed(lambda: _render(pool, scrapes)))

        async def over_http() -> Run:
            return _per_scrape(await timed(lambda: _fetch(metrics_address, scrapes)))

        runs = await bench.compare({"text": render, "http": over_http})
    observed = _round_trip_count(text, pool.config.namespace)
    quick = "" if total >= 10**5 else f"; quick mode: {CHANNELS * each:,} round trips, not 10^5"
    results = []
    for number, key, title in (
        ("8", "text", "/metrics scrape: pool.metrics_text()"),
        ("8h", "http", "/metrics scrape over HTTP (hypercorn, same process)"),
    ):
        median = spread(runs[key]).median
        results.append(
            Result(
                number, f"scrape-{key}", f"{title}, {CHANNELS} channels", "ms/scrape",
                runs[key], "-", None, None, "", f"<= {TARGET_MS:g} ms", median <= TARGET_MS,
                (f"after {observed:,} round trips (round_trip_seconds_count; loaded at"
                 f" {load.rate:,.0f}/s); {scrapes} scrapes per repeat; CPU µs/op is per"
                 f" scrape{quick}",),
            )
        )  # fmt: skip
    return results


async def _render(pool: SecureChannelPool, n: int) -> int:
    for _ in range(n):
        if not pool.metrics_text():
            raise RuntimeError("empty metrics text")
    await trio.lowlevel.checkpoint()
    return n


async def _fetch(address: tuple[str, int], n: int) -> int:
    for _ in range(n):
        if not await get_close(address, "/metrics"):
            raise RuntimeError("empty /metrics response")
    return n
