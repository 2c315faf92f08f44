"""The ``trio-securechannel`` command: ``demo``, ``probe`` and ``bench``.

Kept out of the library's import path: ``import trio_securechannel`` never loads this
package, and its extras (rich for the terminal, trustme for the demo's throwaway CA) are
only needed here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

_N = TypeVar("_N", int, float)

DESCRIPTION = "A Trio pool of TLS channels to relays: see it work, check a relay, measure it."

_DEMO_EXAMPLES = """\
examples:
  trio-securechannel demo                      # 10 s of traffic through a local relay
  trio-securechannel demo --fault down         # watch the breaker open, half-open, close
  trio-securechannel demo --fault slow --workers 16 --duration 20
  trio-securechannel demo --websocket --fault flaky   # WebSocket messages over wss://
"""
_PROBE_EXAMPLES = """\
examples:
  trio-securechannel probe electrum.blockstream.info:50002
  trio-securechannel probe relay.example.com:443 --cafile company-ca.pem --count 20
  trio-securechannel probe [2001:db8::7]:50002 --json
  trio-securechannel probe relay.example.com:7000 --send PING          # a line protocol
  trio-securechannel probe electrum.example.org:50002 --pin sha256/...  # self-signed
  trio-securechannel probe wss://relay.example.com/ws
"""
_BENCH_EXAMPLES = """\
examples:
  trio-securechannel bench --quick             # a smoke run, under a minute
  trio-securechannel bench --json results.json
  trio-securechannel bench --quick --only 4,checkout --repeats 7
"""

#: ``demo --workers`` and ``--duration``: a demo on one machine, not a load generator.
DEMO_WORKERS = (1, 1000)
DEMO_DURATION = (0.1, 86_400.0)  # seconds: a tenth of a second to a day
#: ``probe --count``: round trips to measure a relay by, not to load it.
PROBE_COUNT = (1, 10_000)
#: The exit status after Ctrl-C (SIGINT), as a shell reports a process it interrupted.
INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-securechannel", description=DESCRIPTION)
    parser.add_argument(
        "-V",
        "--version",
        action="version",
        version=f"%(prog)s {version()}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    demo = commands.add_parser(
        "demo",
        help="traffic through a pool to an embedded local TLS relay, with live figures",
        description="Start a TLS echo relay on 127.0.0.1 (throwaway CA), open a pool against "
        "it with its metrics server, drive traffic and show what the pool sees. Ctrl-C stops "
        "the traffic and prints the summary, a second Ctrl-C stops at once; either way the "
        "exit status is 130.",
        epilog=_DEMO_EXAMPLES,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--duration",
        type=_bounded(float, *DEMO_DURATION),
        default=10.0,
        help=f"seconds, {DEMO_DURATION[0]:g} to {DEMO_DURATION[1]:g} (10)",
    )
    demo.add_argument(
        "--workers",
        type=_bounded(int, *DEMO_WORKERS),
        default=8,
        help=f"concurrent tasks, {DEMO_WORKERS[0]} to {DEMO_WORKERS[1]} (8)",
    )
    demo.add_argument(
        "--fault",
        choices=["none", "flaky", "down", "slow"],
        default="none",
        help="make the relay misbehave: reset some requests (flaky), go down and come back "
        "(down), answer slowly on some connections (slow)",
    )
    demo.add_argument(
        "--websocket",
        action="store_true",
        help="the relay speaks WebSocket over TLS (wss://): messages instead of bytes",
    )

    probe = commands.add_parser(
        "probe",
        help="connect to a real relay and report its TLS facts and latency",
        description="Connect to HOST:PORT (or a wss:// URL) with verified TLS, print the "
        "TLS version, cipher, certificate, key pin and latencies; exit non-zero with one "
        "line on failure. A raw TLS relay is spoken to as an Electrum server (server.version "
        "then server.ping) unless --send is given; a wss:// relay is pinged.",
        epilog=_PROBE_EXAMPLES,
        formatter_class=formatter,
    )
    probe.add_argument("target", help="HOST:PORT, [V6ADDR]:PORT or wss://HOST[:PORT]/PATH")
    probe.add_argument("--cafile", help="trust this PEM bundle instead of the system roots")
    probe.add_argument(
        "--count",
        type=_bounded(int, *PROBE_COUNT),
        default=5,
        help="round trips (5; at most 10000)",
    )
    probe.add_argument(
        "--send",
        metavar="LINE",
        help="send this line each round trip and read one line back, instead of the"
        " default Electrum exchange (server.version, then server.ping calls)",
    )
    probe.add_argument(
        "--pin",
        metavar="sha256/BASE64",
        help="trust the relay by this public-key pin instead of a CA (a self-signed relay)",
    )
    probe.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds (10)")
    probe.add_argument("--json", action="store_true", help="machine-readable output")

    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite (from a source checkout) and print its table",
        description="Run the benchmark suite of a source checkout (python -m benchmarks) and "
        "print its table. Options it does not know itself are passed on to the suite as "
        "they are.",
        epilog=_BENCH_EXAMPLES,
        formatter_class=formatter,
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes, a smoke run in under a minute (not a timing gate)",
    )
    bench.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON (relative to here)"
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="measured repeats per variant after one warm-up (the suite's minimum, 5)",
    )
    bench.add_argument(
        "--only",
        action="append",
        metavar="NAMES",
        help="comma-separated measurement numbers or names, e.g. 4 or checkout (python -m "
        "benchmarks --help lists them); may be repeated",
    )
    return parser


def version() -> str:
    """The running code's version: `trio_securechannel.__version__`, which the package's
    metadata is built from (the metadata of an older install may linger beside a newer
    source tree)."""
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    # Known options only, so that bench can pass the suite's others on: argparse.REMAINDER
    # after a subcommand refuses anything that starts with "-".
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo":
            from ._demo import demo

            return demo(args.duration, args.workers, args.fault, args.websocket)
        if args.command == "probe":
            from ._probe import probe

            return probe(args)
        from ._bench import bench

        return bench(args, extra)
    except ImportError as exc:
        print(f"error: {exc.name or exc} is missing: pip install 'trio-securechannel[cli]'",
              file=sys.stderr)  # fmt: skip
        return 1
    except BaseException as exc:  # Ctrl-C only: anything else goes on up
        if not interrupted(exc):
            raise
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C: a KeyboardInterrupt, or a group (from Trio's nurseries) of
    nothing but KeyboardInterrupts."""
    if isinstance(exc, BaseExceptionGroup):
        return all(interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _bounded(kind: Callable[[str], _N], low: _N, high: _N) -> Callable[[str], _N]:
    """An argparse type: a number of ``kind`` from ``low`` to ``high``, both included."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str) -> _N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {noun}: {text!r}") from None
        if not low <= value <= high:  # a NaN too
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}: {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value
