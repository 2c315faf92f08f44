"""Measurement 12: what a checkout costs as the pool grows, and status() and /metrics at size.

Checkout + give-back with no I/O (as case 4) on pools holding 10, 100 and 1,000 idle
channels on one relay, and 16 idle channels on each of 1, 4 and 16 relays (distinct ports of
the benchmark server); quick mode uses smaller pools (`Scale.pool_sizes`,
`Scale.channels_per_relay`). It should stay flat: the figure of interest is the ratio of the
largest to the smallest. Then `SecureChannelPool.status`, `SecureChannelPool.metrics_text`
and a ``/metrics`` scrape over HTTP with the largest pool, against the smallest.

Every pool is open at once and the variants take turns, so the garbage collector and the
caches see the same heap whichever pool is measured: the ratios are the pool's own cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from trio_securechannel import SecureChannelPool, Target, open_pool

from ._bench import Bench
from ._clients import fill
from ._http import get_close
from ._measure import Run, Variant, paired_ratio, timed
from ._report import Result

#: Relays the pools of the second series spread over.
RELAY_COUNTS = (1, 4, 16)
#: Handshakes under way at once while a pool fills.
CONCURRENCY = 50
#: Checkout cost counts as flat up to this ratio (largest pool against smallest).
FLAT = 1.10
#: Long enough that no idle channel is reaped while the case runs (checked after it), and
#: that no cleanup pass runs: one pool's pass (a poll() per idle channel) would land in
#: another pool's run. Its cost is per second, not per checkout.
QUIET = 3600.0


@dataclass(frozen=True)
class _Pools:
    """The open pools, by idle channels on one relay and by number of relays."""

    by_size: dict[int, SecureChannelPool]
    by_relays: dict[int, SecureChannelPool]


async def scale(bench: Bench) -> list[Result]:
    """12: checkout cost with 10-1,000 channels and 1-16 relays; status() and /metrics."""
    sizes, per_relay = bench.scale.pool_sizes, bench.scale.channels_per_relay
    if max(RELAY_COUNTS) > len(bench.servers.relays):
        offered = len(bench.servers.relays)
        raise RuntimeError(f"the server offers {offered} relays, case 12 needs {RELAY_COUNTS}")
    async with contextlib.AsyncExitStack() as stack:
        pools = await _open_pools(bench, stack)
        n = bench.scale.checkouts
        checkout_runs = await bench.compare(
            {f"{size} channels": _checkouts(pool, n) for size, pool in pools.by_size.items()}
            | {f"{count} relays": _checkouts(pool, n) for count, pool in pools.by_relays.items()}
        )
        small, large = pools.by_size[sizes[0]], pools.by_size[sizes[-1]]
        calls = bench.scale.scrapes
        read_runs = await bench.compare(
            {
                f"{kind} {label}": _calls(read, pool, calls)
                for kind, read in (("status", _status), ("text", _text), ("http", _scrape))
                for label, pool in (("large", large), ("small", small))
            }
        )
        _check_sizes(pools, sizes, per_relay)
    return _checkout_results(bench, checkout_runs) + _read_results(bench, read_runs)


async def _open_pools(bench: Bench, stack: contextlib.AsyncExitStack) -> _Pools:
    context = bench.client_context()
    sizes, per_relay = bench.scale.pool_sizes, bench.scale.channels_per_relay
    by_size: dict[int, SecureChannelPool] = {}
    for size in sizes:
        by_size[size] = pool = await stack.enter_async_context(
            open_pool(
                bench.servers.echo,
                ssl_context=context,
                max_connections=size,
                metrics_port=0,
                idle_timeout=QUIET,
                cleanup_interval=QUIET,
            )
        )
        await fill(pool, size, concurrency=CONCURRENCY)
    by_relays: dict[int, SecureChannelPool] = {}
    for count in RELAY_COUNTS:
        targets: list[Target] = list(bench.servers.relays[:count])
        by_relays[count] = pool = await stack.enter_async_context(
            open_pool(
                targets,
                ssl_context=context,
                max_connections=per_relay,  # per relay
                idle_timeout=QUIET,
                cleanup_interval=QUIET,
            )
        )
        await fill(pool, count * per_relay, concurrency=CONCURRENCY)
    return _Pools(by_size, by_relays)


def _check_sizes(pools: _Pools, sizes: tuple[int, ...], per_relay: int) -> None:
    """The pools still hold what they were filled with: no figure is mislabelled."""
    expected = [(pools.by_size[size], size) for size in sizes] + [
        (pools.by_relays[count], count * per_relay) for count in RELAY_COUNTS
    ]
    for pool, channels in expected:
        if len(pool.channels()) != channels:
            raise RuntimeError(f"{pool!r} holds {len(pool.channels())} channels, not {channels}")


def _checkouts(pool: SecureChannelPool, n: int) -> Variant:
    """``n`` checkouts and give-backs with no I/O in between (as case 4), in µs/op."""

    async def work() -> int:
        for _ in range(n):
            async with pool.connection():
                pass
        return n

    async def variant() -> Run:
        return (await timed(work)).latency()

    return variant


async def _status(pool: SecureChannelPool, n: int) -> int:
    for _ in range(n):
        if not pool.status()["channels"]:
            raise RuntimeError("status() lists no channels")
    await trio.lowlevel.checkpoint()
    return n


async def _text(pool: SecureChannelPool, n: int) -> int:
    for _ in range(n):
        if not pool.metrics_text():
            raise RuntimeError("empty metrics text")
    await trio.lowlevel.checkpoint()
    return n


async def _scrape(pool: SecureChannelPool, n: int) -> int:
    address = pool.metrics_address
    assert address is not None
    for _ in range(n):
        if not await get_close(address, "/metrics"):
            raise RuntimeError("empty /metrics response")
    return n


def _calls(
    read: Callable[[SecureChannelPool, int], Awaitable[int]], pool: SecureChannelPool, n: int
) -> Variant:
    """``n`` calls of ``read``, in ms/call."""

    async def variant() -> Run:
        timing = await timed(lambda: read(pool, n))
        return Run(timing.wall / timing.ops * 1e3, timing.cpu_us)

    return variant


def _quick_note(bench: Bench) -> str:
    if not bench.quick:
        return ""
    sizes = ", ".join(f"{size:,}" for size in bench.scale.pool_sizes)
    return (
        f"; quick mode: pools of {sizes} channels and {bench.scale.channels_per_relay} per"
        " relay (full: 10, 100, 1,000 and 16)"
    )


def _checkout_results(bench: Bench, runs: dict[str, list[Run]]) -> list[Result]:
    small, middle, large = bench.scale.pool_sizes
    per_relay = bench.scale.channels_per_relay
    few, some, many = RELAY_COUNTS
    quick = _quick_note(bench)

    def by_size(size: int) -> list[Run]:
        return runs[f"{size} channels"]

    def by_relays(count: int) -> list[Run]:
        return runs[f"{count} relays"]

    def relays(count: int) -> str:
        return f"{count} relay{'s' * (count > 1)} x {per_relay} idle channels"

    title = "checkout + give-back, no I/O"
    flat = f"flat (<= {FLAT:.2f}x)"
    information = "- (information)"
    size_ratio = paired_ratio(by_size(large), by_size(small))
    relay_ratio = paired_ratio(by_relays(many), by_relays(few))
    many_some = paired_ratio(by_relays(many), by_relays(some))
    return [
        Result(
            "12", "scale-channels", f"{title}, 1 relay, {large:,} idle channels", "µs/op",
            by_size(large), f"{small} idle channels", by_size(small),
            size_ratio, "time", flat, size_ratio <= FLAT,
            (f"{bench.scale.checkouts} checkouts per repeat, 1 task; all six pools of case"
             " 12 are open at once and take turns; every channel did one round trip before"
             f" it went idle; no cleanup passes while measuring{quick}",),
        ),
        Result(
            "12c", "scale-channels-middle", f"{title}, 1 relay, {middle:,} idle channels",
            "µs/op", by_size(middle), f"{small} idle channels", by_size(small),
            paired_ratio(by_size(middle), by_size(small)), "time", information, None,
        ),
        Result(
            "12r", "scale-relays", f"{title}, {relays(many)}", "µs/op",
            by_relays(many), relays(few), by_relays(few),
            relay_ratio, "time", flat, relay_ratio <= FLAT,
            (f"relays are distinct ports of the benchmark server, max_connections={per_relay}"
             " per relay; with several relays a checkout is routed (power of two choices),"
             f" with one it is not; {many} relays against {some}: {many_some:.3g}x",),
        ),
        Result(
            "12r4", "scale-relays-middle", f"{title}, {relays(some)}", "µs/op",
            by_relays(some), relays(few), by_relays(few),
            paired_ratio(by_relays(some), by_relays(few)), "time", information, None,
        ),
    ]  # fmt: skip


def _read_results(bench: Bench, runs: dict[str, list[Run]]) -> list[Result]:
    small, large = bench.scale.pool_sizes[0], bench.scale.pool_sizes[-1]
    calls = bench.scale.scrapes
    results = []
    for number, kind, title, note in (
        (
            "12s",
            "status",
            "pool.status()",
            f"{calls} calls per repeat; the six variants of 12s-12h take turns; idle channels"
            f" that did one round trip each; CPU µs/op is per call{_quick_note(bench)}",
        ),
        ("12m", "text", "pool.metrics_text()", "as 12s"),
        (
            "12h",
            "http",
            "/metrics scrape over HTTP (hypercorn, same process)",
            "as 12s, with a new connection per scrape (Connection: close), as 8h",
        ),
    ):
        ours, baseline = runs[f"{kind} large"], runs[f"{kind} small"]
        results.append(
            Result(
                number, f"scale-{kind}", f"{title}, 1 relay, {large:,} channels", "ms/call",
                ours, f"{small} channels", baseline,
                paired_ratio(ours, baseline), "time", "- (information)", None, (note,),
            )
        )  # fmt: skip
    return results
