"""``trio-securechannel bench``: run the benchmark suite of a source checkout."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import trio_securechannel


def bench(args: list[str]) -> int:
    root = Path(trio_securechannel.__file__).resolve().parent.parent
    missing = [name for name in ("httpcore", "trustme") if importlib.util.find_spec(name) is None]
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
    return subprocess.call([sys.executable, "-m", "benchmarks", *args], cwd=root)
