"""``trio-securechannel bench``: run the benchmark suite of a source checkout."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import trio_securechannel


def runner_arguments(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The command line for ``python -m benchmarks``: the options ``bench`` knows, then the
    ones it passes on as they are."""
    argv = ["--quick"] if args.quick else []
    if args.json is not None:
        # The suite runs in the checkout: a relative path is the user's, from here.
        argv += ["--json", os.path.abspath(args.json)]
    if args.repeats is not None:
        argv += ["--repeats", str(args.repeats)]
    for names in args.only or ():
        argv += ["--only", names]
    return argv + [item for item in extra if item != "--"]


def bench(args: argparse.Namespace, extra: list[str]) -> int:
    root = Path(trio_securechannel.__file__).resolve().parent.parent
    needed = ("httpcore", "trustme", "aiorpcx")  # the bench extra
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: the benchmarks need {', '.join(missing)}: pip install -e '.[bench]'",
              file=sys.stderr)  # fmt: skip
        return 1
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(
            "error: the benchmarks ship with the source tree, not the package;"
            " run this from a checkout installed with pip install -e",
            file=sys.stderr,
        )
        return 1
    command = [sys.executable, "-m", "benchmarks", *runner_arguments(args, extra)]
    status = subprocess.call(command, cwd=root)
    return 128 - status if status < 0 else status  # killed by a signal: as a shell says it
