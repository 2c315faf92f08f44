"""Repeats, warm-up, timing (wall clock and the client's CPU time) and the statistics.

Variants of one measurement (ours and its baseline) take turns, repeat after repeat, so a
drift of the machine (another process, CPU frequency) touches both alike. Every run is
bounded in time: one that takes longer than ``limit`` seconds fails the benchmark.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Run:
    """One repeat's figure, in the measurement's unit, and client CPU µs per operation."""

    value: float
    cpu_us: float | None = None


@dataclass(frozen=True)
class Spread:
    """Median, min and max of the repeats."""

    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


def spread(runs: Sequence[Run]) -> Spread:
    return Spread.of([run.value for run in runs])


def cpu_spread(runs: Sequence[Run]) -> Spread | None:
    values = [run.cpu_us for run in runs if run.cpu_us is not None]
    return Spread.of(values) if values else None


@dataclass(frozen=True)
class Timing:
    """Wall-clock and client-process CPU seconds spent on ``ops`` operations."""

    wall: float
    cpu: float
    ops: int

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.ops / self.wall

    @property
    def wall_us(self) -> float:
        return self.wall / self.ops * 1e6

    @property
    def cpu_us(self) -> float:
        """Client CPU µs per operation (process time: every thread of this process)."""
        return self.cpu / self.ops * 1e6

    def throughput(self) -> Run:
        """Operations per second, with the client CPU per operation."""
        return Run(self.rate, self.cpu_us)

    def latency(self) -> Run:
        """Wall-clock µs per operation, with the client CPU per operation."""
        return Run(self.wall_us, self.cpu_us)


async def timed(work: Callable[[], Awaitable[int]]) -> Timing:
    """Run ``work`` (which returns how many operations it did) and time it."""
    gc.collect()  # a collection owed by the setup must not land inside the measurement
    cpu, wall = time.process_time(), time.perf_counter()
    ops = await work()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, ops)


Variant = Callable[[], Awaitable[Run]]


async def compare(
    variants: Mapping[str, Variant], *, repeats: int, warmups: int, limit: float
) -> dict[str, list[Run]]:
    """Warm each variant up, then run them in turns, ``repeats`` times each.

    Raises:
        trio.TooSlowError: A single run took longer than ``limit`` seconds.
    """
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for index in range(warmups + repeats):
        for name, variant in variants.items():
            with trio.fail_after(limit):
                run = await variant()
            if index >= warmups:
                runs[name].append(run)
    return runs


def paired_ratio(
    numerators: Sequence[Run], denominators: Sequence[Run], *, cpu: bool = False
) -> float:
    """The median over repeats of ``numerator / denominator``, repeat by repeat.

    The variants ran in turns, so each pair ran moments apart: a slow spell of the machine
    (another process, frequency scaling) touches both sides of a pair, and cancels out.
    With ``cpu``, the ratio is of client CPU µs/op rather than of the figures.
    """
    ratios = []
    for top, bottom in zip(numerators, denominators, strict=True):
        if cpu:
            assert top.cpu_us is not None
            assert bottom.cpu_us is not None
            ratios.append(top.cpu_us / bottom.cpu_us)
        else:
            ratios.append(top.value / bottom.value)
    return statistics.median(ratios)


def paired_cpu_difference(minuends: Sequence[Run], subtrahends: Sequence[Run]) -> float:
    """The median over repeats of the difference in client CPU µs/op, repeat by repeat."""
    differences = []
    for top, bottom in zip(minuends, subtrahends, strict=True):
        assert top.cpu_us is not None
        assert bottom.cpu_us is not None
        differences.append(top.cpu_us - bottom.cpu_us)
    return statistics.median(differences)
