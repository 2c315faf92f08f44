"""A measurement's result, and the two ways it is reported: a Markdown table and JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._measure import Run, Spread, cpu_spread, spread


@dataclass(frozen=True)
class Result:
    """One row of the table.

    Attributes:
        number: The measurement's number in issue 7 ("8h": a second row for case 8).
        ours: The measured side's repeats: the pool's, except in rows that measure a
            baseline against another (a floor row such as "1f" says so in its title).
        ratio: How ours compares with the baseline, in the sense the target states it
            (``ratio_meaning``); None when there is no baseline.
        holds: Whether the target holds; None when there is no target.
        cpu_difference: Client CPU µs/op of ours minus the baseline's, the median of the
            differences within each repeat; None where a row does not state it.
    """

    number: str
    slug: str
    title: str
    unit: str
    ours: list[Run]
    baseline_label: str
    baseline: list[Run] | None
    ratio: float | None
    ratio_meaning: str
    target: str
    holds: bool | None
    notes: tuple[str, ...] = ()
    cpu_difference: float | None = None

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "MISSED", None: "-"}[self.holds]


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _spread(figures: Spread | None) -> str:
    if figures is None:
        return "-"
    return f"{_number(figures.median)} ({_number(figures.minimum)}-{_number(figures.maximum)})"


def _cpu(runs: Sequence[Run] | None) -> str:
    figures = cpu_spread(runs) if runs else None
    return "-" if figures is None else _number(figures.median)


def _cpu_column(result: Result) -> str:
    column = f"{_cpu(result.ours)} / {_cpu(result.baseline)}"
    if result.cpu_difference is not None:
        column += f" ({result.cpu_difference:+.1f})"
    return column


HEADER = (
    "| # | measurement | unit | measured: median (min-max) | baseline"
    " | baseline: median (min-max) | ratio | client CPU µs/op measured / baseline (difference)"
    " | target | verdict |"
)


def table(results: Sequence[Result]) -> str:
    """The results as a Markdown table, with each row's notes below it."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    notes: list[str] = []
    for result in results:
        ratio = "-" if result.ratio is None else f"{result.ratio:.3g}x {result.ratio_meaning}"
        lines.append(
            f"| {result.number} | {result.title} | {result.unit}"
            f" | {_spread(spread(result.ours))}"
            f" | {result.baseline_label}"
            f" | {_spread(spread(result.baseline) if result.baseline else None)}"
            f" | {ratio}"
            f" | {_cpu_column(result)}"
            f" | {result.target} | {result.verdict} |"
        )
        notes.extend(f"- {result.number}: {note}" for note in result.notes)
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    held = [r.number for r in results if r.holds is True]
    missed = [r.number for r in results if r.holds is False]
    return f"targets holding: {', '.join(held) or 'none'}; missed: {', '.join(missed) or 'none'}"


def _result_json(result: Result) -> dict[str, Any]:
    data = dataclasses.asdict(result)
    data["verdict"] = result.verdict
    data["ours_spread"] = dataclasses.asdict(spread(result.ours))
    cpu = cpu_spread(result.ours)
    data["ours_cpu_us_spread"] = None if cpu is None else dataclasses.asdict(cpu)
    if result.baseline:
        data["baseline_spread"] = dataclasses.asdict(spread(result.baseline))
        cpu = cpu_spread(result.baseline)
        data["baseline_cpu_us_spread"] = None if cpu is None else dataclasses.asdict(cpu)
    return data


def write_json(
    path: Path, results: Sequence[Result], *, machine: dict[str, Any], settings: dict[str, Any]
) -> None:
    document = {
        "machine": machine,
        "settings": settings,
        "results": [_result_json(result) for result in results],
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
