"""The measurements in order, by number and name, and running a selection of them."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from . import _cases, _http, _jsonrpc, _memory, _scale, _scrape, _websocket
from ._bench import Bench
from ._report import Result


@dataclass(frozen=True)
class Case:
    number: int
    name: str
    run: Callable[[Bench], Awaitable[list[Result]]]


CASES: tuple[Case, ...] = (
    Case(1, "pool16", _cases.pool_of_16),
    Case(2, "pool1", _cases.pool_of_1),
    Case(3, "contention", _cases.contention),
    Case(4, "checkout", _cases.checkout),
    Case(5, "connect", _cases.connect_per_request),
    Case(6, "bulk", _cases.bulk),
    Case(7, "memory", _memory.idle_memory),
    Case(8, "scrape", _scrape.scrape),
    Case(9, "histogram", _memory.histogram_memory),
    Case(10, "http", _http.peer_http),
    Case(11, "ws1", _websocket.websocket_pool_of_1),
    Case(12, "scale", _scale.scale),
    Case(13, "jsonrpc1", _jsonrpc.jsonrpc_pool_of_1),
    Case(14, "jsonrpc16", _jsonrpc.jsonrpc_pool_of_16),
)


def select(names: Sequence[str] | None) -> list[Case]:
    """The cases named (by number or name), in suite order; all when ``names`` is None.

    Raises:
        ValueError: A name matches no case.
    """
    if not names:
        return list(CASES)
    wanted = {name.strip().lower() for item in names for name in item.split(",") if name}
    known = {str(case.number) for case in CASES} | {case.name for case in CASES}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"unknown measurement(s) {', '.join(unknown)}; choose from "
            + ", ".join(f"{case.number}/{case.name}" for case in CASES)
        )
    return [case for case in CASES if str(case.number) in wanted or case.name in wanted]


async def run(bench: Bench, cases: Sequence[Case]) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        began = time.perf_counter()
        print(f"[{case.number}/{case.name}] running...", file=sys.stderr, flush=True)
        case_results = await case.run(bench)
        results.extend(case_results)
        verdicts = ", ".join(f"{r.number}: {r.verdict}" for r in case_results)
        print(
            f"[{case.number}/{case.name}] {verdicts} ({time.perf_counter() - began:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return results
