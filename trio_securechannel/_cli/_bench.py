"""``trio-securechannel bench``: run the benchmark suite of a source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio_securechannel


def bench(args: list[str]) -> int:
    root = Path(trio_securechannel.__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(
            "error: the benchmarks ship with the source tree, not the package;"
            " run this from a checkout installed with pip install -e",
            file=sys.stderr,
        )
        return 1
    return subprocess.call([sys.executable, "-m", "benchmarks", *args], cwd=root)
