"""``trio-securechannel demo``: traffic through a pool to the embedded relay, live."""

from __future__ import annotations

import logging
import secrets
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import trio
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

import trio_securechannel as sc

from . import INTERRUPTED
from ._demo_relay import DemoRelay, Fault

PAYLOAD = b'{"jsonrpc": "2.0", "method": "blockchain.transaction.broadcast", "params": ["02..."]}\n'


class Traffic:
    """What the workers did, as they saw it."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.failures: dict[str, int] = {}
        self.recent: deque[tuple[float, int]] = deque(maxlen=8)  # (time, round trips)
        self.latencies: deque[float] = deque(maxlen=200_000)  # seconds, the latest ones
        self.stop = trio.Event()

    def failed(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.failures[name] = self.failures.get(name, 0) + 1

    def percentiles(self) -> str:
        ordered = sorted(self.latencies)
        if not ordered:
            return "-"
        picks = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99))
        return " / ".join(f"{value * 1000:.2f} ms" for value in picks)

    def rate(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


async def worker(pool: sc.SecureChannelPool, traffic: Traffic, websocket: bool) -> None:
    while not traffic.stop.is_set():  # stop between round trips: channels go back whole
        began = trio.current_time()
        try:
            if websocket:
                await _message_round_trip(pool)
            else:
                await _stream_round_trip(pool)
            traffic.round_trips += 1
            traffic.latencies.append(trio.current_time() - began)
        except sc.CircuitOpen as exc:
            traffic.failed(exc)
            await trio.sleep(min(exc.retry_after, 0.25))  # what a polite client does
        except (sc.SecureChannelError, trio.BrokenResourceError) as exc:
            traffic.failed(exc)
            await trio.sleep(0.05)


async def _stream_round_trip(pool: sc.SecureChannelPool) -> None:
    async with pool.connection() as channel:
        await channel.send_all(PAYLOAD)
        reply = b""
        while len(reply) < len(PAYLOAD):
            chunk = await channel.receive_some()
            if not chunk:
                raise trio.BrokenResourceError("the relay closed the channel")
            reply += chunk


async def _message_round_trip(pool: sc.SecureChannelPool) -> None:
    async with pool.websocket() as channel:
        await channel.send_message(PAYLOAD.decode())
        if await channel.get_message() != PAYLOAD.decode():
            raise trio.BrokenResourceError("the relay answered something else")


def live_table(pool: sc.SecureChannelPool, traffic: Traffic, elapsed: float) -> Table:
    status = pool.status()
    connections, latency = status["connections"], status["latency"]["round_trip"]
    table = Table(title=f"trio-securechannel demo: {elapsed:5.1f} s", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("round trips", f"{traffic.round_trips:,}  ({traffic.rate():,.0f}/s)")
    table.add_row("latency p50 / p99", f"{_ms(latency['p50_ms'])} / {_ms(latency['p99_ms'])}")
    table.add_row(
        "channels idle / in use / max",
        f"{connections['idle']} / {connections['in_use']} / {connections['max']}",
    )
    table.add_row("breaker", status["breaker"]["state"])
    table.add_row("errors (counted once)", str(status["errors_total"]))
    table.add_row("retired slow", str(connections["closed_by_reason"].get("slow", 0)))
    return table


def summary_table(status: sc.PoolStatus, traffic: Traffic, elapsed: float) -> Table:
    table = Table(title="Summary")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_row("duration", f"{elapsed:.1f} s")
    table.add_row("round trips", f"{traffic.round_trips:,}")
    table.add_row("round trips/s", f"{traffic.round_trips / max(elapsed, 1e-9):,.0f}")
    table.add_row("checkout + round trip p50 / p90 / p99", traffic.percentiles())
    table.add_row("channels opened", str(status["connections"]["opened_total"]))
    closed = status["connections"]["closed_by_reason"]
    table.add_row(
        "channels closed", ", ".join(f"{k} {v}" for k, v in sorted(closed.items())) or "0"
    )
    errors = status["errors_by_kind"]
    table.add_row("errors by kind", ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0")
    table.add_row("breaker opened", str(status["breaker"]["opened_total"]))
    table.add_row("breaker rejected", str(status["breaker"]["rejected_total"]))
    table.add_row("pool exhausted", str(status["pool_exhausted_total"]))
    failures = ", ".join(f"{k} {v}" for k, v in sorted(traffic.failures.items()))
    table.add_row("failures seen by workers", failures or "none")
    return table


class CtrlC:
    """The demo's Ctrl-C (SIGINT) presses: the first stops the traffic, the summary is still
    printed; a second stops everything at once. Either way the exit status is 130.

    Not one press becomes a KeyboardInterrupt: Trio would raise it through the nurseries as
    an exception group (a traceback), and Python at exit would die of it. While the demo
    runs, Trio's signal receiver takes the presses (`watch`); before it opens and after it
    closes, `handler` counts them (Trio leaves a custom SIGINT handler alone).
    """

    def __init__(self) -> None:
        self.presses = 0
        self.forced = False  # a second press cut the demo short

    def handler(self, signum: int, frame: object) -> None:
        self.presses += 1

    async def watch(
        self, presses: AsyncIterator[int], stop: trio.Event, everything: trio.CancelScope
    ) -> None:
        """Stop the traffic on the first press, ``everything`` on the second (counting those
        before this began)."""
        self._act(stop, everything)
        async for _ in presses:
            self.presses += 1
            self._act(stop, everything)

    def _act(self, stop: trio.Event, everything: trio.CancelScope) -> None:
        if self.presses:
            stop.set()  # the workers stop between round trips, then the summary
        if self.presses > 1:
            self.forced = True
            everything.cancel()  # no more waiting


async def run_demo(
    duration: float, workers: int, fault: Fault, console: Console, websocket: bool, ctrl_c: CtrlC
) -> None:
    """Run the demo and print its summary, or stop at once on a second Ctrl-C."""
    traffic = Traffic()
    with trio.open_signal_receiver(signal.SIGINT) as presses:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctrl_c.watch, presses, traffic.stop, nursery.cancel_scope)
            await _run(duration, workers, fault, console, websocket, traffic)
            nursery.cancel_scope.cancel()


async def _run(
    duration: float, workers: int, fault: Fault, console: Console, websocket: bool, traffic: Traffic
) -> None:
    relay = DemoRelay(fault, websocket=websocket)
    token = secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        options: dict[str, Any] = {
            "ssl_context": relay.client_context(),
            "max_connections": max(2, workers // 2),
            "min_idle": 2,
            "acquire_timeout": 2.0,
            "cleanup_interval": 1.0,
            "breaker_failure_threshold": 3,
            "breaker_cooldown": 2.0,
            "max_latency_ms": 50.0 if fault == "slow" else None,
            "metrics_port": 0,
            "metrics_auth_token": token,
            "namespace": "demo",
        }
        scheme = "wss" if websocket else "tls"
        target = f"{scheme}://127.0.0.1:{relay.port}" + ("/" if websocket else "")
        async with sc.open_pool(target, **options) as pool:
            assert pool.metrics_address is not None
            host, port = pool.metrics_address
            console.print(f"relay:   {target} (throwaway CA), fault: {fault}")
            console.print(f"metrics: http://{host}:{port}/metrics  /status  /healthz  /events")
            console.print(f"token:   {token}")
            console.print(f'try:     curl -H "Authorization: Bearer {token}" '
                          f"http://{host}:{port}/status", soft_wrap=True)  # fmt: skip
            began = trio.current_time()
            async with trio.open_nursery() as traffic_nursery:
                for _ in range(workers):
                    traffic_nursery.start_soon(worker, pool, traffic, websocket)
                with Live(console=console, refresh_per_second=4, transient=True) as live:
                    with trio.move_on_after(duration):
                        while not traffic.stop.is_set():
                            now = trio.current_time()
                            traffic.recent.append((now, traffic.round_trips))
                            live.update(live_table(pool, traffic, now - began))
                            await trio.sleep(0.25)
                    traffic.stop.set()
            elapsed = trio.current_time() - began
            status = pool.status()
        nursery.cancel_scope.cancel()
    if elapsed < duration * 0.95:  # Ctrl-C
        console.print(f"stopped early, after {elapsed:.1f} s")
    console.print(summary_table(status, traffic, elapsed))


def demo(duration: float, workers: int, fault: Fault, websocket: bool = False) -> int:
    console = Console()
    # The pool's own warnings (the breaker opening, spares failing) scroll above the live
    # table instead of tearing through it; and the breaker's every transition, its
    # half-opening and closing (INFO) as well as its opening (WARNING).
    handler = RichHandler(console=console, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
    logging.getLogger("trio_securechannel.breaker").setLevel(logging.INFO)
    ctrl_c = CtrlC()
    signal.signal(signal.SIGINT, ctrl_c.handler)
    try:
        trio.run(run_demo, duration, workers, fault, console, websocket, ctrl_c)
    finally:
        # Nothing is left but the interpreter's exit, which would put a Python handler back
        # to the default, dying of a late press: ignored (left as it is) instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if ctrl_c.forced:
        print("interrupted", file=sys.stderr)
    return INTERRUPTED if ctrl_c.presses else 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"
