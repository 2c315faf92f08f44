"""``python -m benchmarks``: run the suite and print the table (``--json PATH`` too)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from . import _suite
from ._bench import FULL, QUICK, Bench
from ._machine import describe, pin
from ._report import summary, table, write_json
from ._server import running_server
from ._tls import make_certificates

MIN_REPEATS = 5


def _repeats(text: str) -> int:
    value = int(text)
    if value < MIN_REPEATS:
        raise argparse.ArgumentTypeError(f"at least {MIN_REPEATS} repeats, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark trio_securechannel against its baselines, measured side by side in one"
            " run, with a loopback TLS server in a separate process."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes, for a CI smoke run in under a minute (not a timing gate)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--repeats",
        type=_repeats,
        default=MIN_REPEATS,
        metavar="N",
        help=f"measured repeats per variant, after one warm-up (default and minimum {MIN_REPEATS})",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAMES",
        help="comma-separated measurement numbers or names ("
        + ", ".join(f"{case.number}/{case.name}" for case in _suite.CASES)
        + "); may be repeated",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cases = _suite.select(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server_cpu, client_cpus = pin()
    machine = describe(server_cpu=server_cpu, client_cpus=client_cpus)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        certificates = make_certificates(Path(directory))
        with running_server(certificates.server_file, cpu=server_cpu) as servers:
            bench = Bench(
                servers=servers,
                ca_file=certificates.ca_file,
                scale=QUICK if args.quick else FULL,
                quick=args.quick,
                repeats=args.repeats,
                server_file=certificates.server_file,
                server_cpu=server_cpu,
            )
            results = trio.run(_suite.run, bench, cases)
    elapsed = time.perf_counter() - began
    print(table(results))
    print()
    print(summary(results))
    pinning = (
        f"server on CPU {server_cpu}, client on {client_cpus}" if server_cpu is not None else
        "no CPU pinning"
    )  # fmt: skip
    print(
        "ratio, (difference): the medians over repeats of the ratio and of the client CPU"
        " difference within each repeat (variants take turns)"
    )
    print(
        f"{'quick' if args.quick else 'full'} run, {args.repeats} repeats after 1 warm-up,"
        f" {pinning}; {elapsed:.0f} s"
    )
    if args.json is not None:
        settings = {
            "quick": args.quick,
            "repeats": args.repeats,
            "warmups": bench.warmups,
            "only": [case.name for case in cases],
            "seconds": round(elapsed, 1),
        }
        write_json(args.json, results, machine=machine, settings=settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
