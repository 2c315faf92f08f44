"""Random interleavings of checkouts, cancellations and relay failures (hypothesis).

Whatever happens, at every scheduling step the pool never holds more than
``max_connections``; and once things are quiet nothing is in use, nobody waits, and
``max_connections`` checkouts at once succeed. Real TLS over 127.0.0.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import new_relay
from helpers import assert_all_slots_free, books, echo, wait_until


@dataclass(frozen=True)
class Op:
    kind: str  # "use", "raise", "reset" or "refuse"
    start: float  # seconds after the run begins
    hold: float  # how long a "use" keeps its channel, or a "refuse" lasts
    cancel_after: float | None  # a "use" is cancelled this long after it starts


ops = st.builds(
    Op,
    kind=st.sampled_from(["use", "use", "use", "raise", "reset", "refuse"]),
    start=st.floats(0, 0.15),
    hold=st.floats(0, 0.05),
    cancel_after=st.none() | st.floats(0, 0.05),
)


class BooksNeverOverflow(trio.abc.Instrument):
    def __init__(self, pool: sc.SecureChannelPool) -> None:
        self.pool = pool
        self.peak = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        slots = self.pool._relays[0]._books
        assert slots.total <= slots.max_connections, slots.__dict__
        self.peak = max(self.peak, slots.total)


class AppError(Exception):
    pass


async def run_op(op: Op, pool: sc.SecureChannelPool, relay: LoopbackRelay, begin: float) -> None:
    await trio.sleep_until(begin + op.start)
    if op.kind == "reset":
        relay.kill_connections()
        return
    if op.kind == "refuse":
        relay.fault = Fault.CLOSE_ON_ACCEPT
        await trio.sleep(op.hold)
        relay.fault = Fault.NONE
        return
    deadline = math.inf if op.cancel_after is None else trio.current_time() + op.cancel_after
    with trio.CancelScope(deadline=deadline):
        try:
            async with pool.connection() as channel:
                if op.kind == "raise":
                    raise AppError
                assert await echo(channel, b"payload") == b"payload"
                await trio.sleep(op.hold)
                assert await echo(channel, b"again") == b"again"
        except (
            AppError,
            sc.PoolExhausted,
            sc.ConnectError,
            sc.CircuitOpen,
            trio.BrokenResourceError,
        ):
            pass  # what a relay failure, a full pool or an open breaker may cause


async def close_the_breaker(pool: sc.SecureChannelPool) -> None:
    """Wait out the cooldown; the trial (ours or the spare keeper's) then closes it."""
    with trio.fail_after(5):
        while pool.breaker_state is not sc.BreakerState.CLOSED:
            try:
                async with pool.connection() as channel:
                    assert await echo(channel, b"trial") == b"trial"
            except sc.CircuitOpen:
                await trio.sleep(0.01)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    schedule=st.lists(ops, min_size=1, max_size=12),
    max_connections=st.integers(1, 4),
    spares=st.integers(0, 4),
    acquire_timeout=st.sampled_from([0.0, 0.02, 10.0]),
)
def test_random_interleavings_keep_the_books(
    ca_file: Path, schedule: list[Op], max_connections: int, spares: int, acquire_timeout: float
) -> None:
    async def main() -> None:
        context = sc.load_root_store(ca_file)
        async with trio.open_nursery() as nursery:
            relay = new_relay()
            await nursery.start(relay.serve)
            options: dict[str, Any] = {
                "max_connections": max_connections,
                "min_idle": min(spares, max_connections),
                "acquire_timeout": acquire_timeout,
                "cleanup_interval": 0.05,
                "connect_timeout": 5.0,
                "breaker_failure_threshold": 3,
                "breaker_cooldown": 0.05,
            }
            async with sc.open_pool(relay.target, ssl_context=context, **options) as pool:
                monitor = BooksNeverOverflow(pool)
                trio.lowlevel.add_instrument(monitor)
                try:
                    begin = trio.current_time()
                    async with trio.open_nursery() as ops_nursery:
                        for op in schedule:
                            ops_nursery.start_soon(run_op, op, pool, relay, begin)
                    relay.fault = Fault.NONE
                    await trio.sleep(0.1)  # quiet: spares settle, the cleanup pass runs
                    await close_the_breaker(pool)
                    # Spares still opening hold slots, which acquire_timeout=0 would not wait for.
                    await wait_until(lambda: books(pool)["opening"] == 0)
                    await assert_all_slots_free(pool)
                finally:
                    trio.lowlevel.remove_instrument(monitor)
                assert monitor.peak <= max_connections
            nursery.cancel_scope.cancel()  # the relay stops

    trio.run(main)
