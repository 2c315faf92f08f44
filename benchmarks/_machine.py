"""What the run ran on: CPUs, the CPU model, and the versions that matter."""

from __future__ import annotations

import os
import platform
import ssl
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def describe(*, server_cpu: int | None, client_cpus: list[int] | None) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "openssl": ssl.OPENSSL_VERSION,
        "trio": package_version("trio"),
        "trio_securechannel": package_version("trio-securechannel"),
        "httpcore": package_version("httpcore"),
        "h11": package_version("h11"),
        "prometheus_client": package_version("prometheus-client"),
        "hypercorn": package_version("hypercorn"),
        "aiorpcx": package_version("aiorpcx"),
        "server_cpu": server_cpu,
        "client_cpus": client_cpus,
    }


def pin() -> tuple[int | None, list[int] | None]:
    """Keep this process off the last CPU we may use, and give that one to the server.

    Returns ``(server_cpu, client_cpus)``, or ``(None, None)`` with a single CPU (or no
    ``sched_setaffinity``): then server and client share what there is.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    server, clients = cpus[-1], cpus[:-1]
    os.sched_setaffinity(0, clients)
    return server, clients
