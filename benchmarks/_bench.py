"""What every measurement gets: the server's addresses, the CA, and the run's sizes."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._measure import Run, Variant, compare
from ._server import Addresses
from ._tls import client_context


@dataclass(frozen=True)
class Scale:
    """How much work one repeat of each measurement does."""

    round_trips_per_task: int  # cases 1, 3: each of 16 tasks
    round_trips_single: int  # cases 2, 5 (pooled side), 11
    checkouts: int  # cases 4, 12
    connects: int  # case 5, connect-per-request side
    bulk_bytes: int  # case 6
    idle_channels: int  # case 7
    scrape_round_trips: int  # case 8, before scraping
    scrapes: int  # case 8, per repeat; case 12, status() and metrics calls per repeat
    observations: int  # case 9, against 10**3
    requests_per_task: int  # case 10: each of 16 tasks
    pool_sizes: tuple[int, ...]  # case 12: idle channels on one relay, smallest first
    channels_per_relay: int  # case 12: with 1, 4 and 16 relays
    calls_single: int  # case 13: JSON-RPC calls, 1 task
    calls_per_task: int  # case 14: JSON-RPC calls, each of 16 tasks


FULL = Scale(
    round_trips_per_task=500,
    round_trips_single=3000,
    checkouts=20_000,
    connects=200,
    bulk_bytes=64 * 2**20,
    idle_channels=1000,
    scrape_round_trips=100_000,
    scrapes=20,
    observations=1_000_000,
    requests_per_task=150,
    pool_sizes=(10, 100, 1000),
    channels_per_relay=16,
    calls_single=2000,
    calls_per_task=250,
)
QUICK = Scale(
    round_trips_per_task=60,
    round_trips_single=400,
    checkouts=4000,
    connects=30,
    bulk_bytes=8 * 2**20,
    idle_channels=200,
    scrape_round_trips=10_000,
    scrapes=5,
    observations=100_000,
    requests_per_task=20,
    pool_sizes=(10, 50, 200),
    channels_per_relay=4,
    calls_single=150,
    calls_per_task=15,
)


@dataclass(frozen=True)
class Bench:
    """The context of one benchmark run."""

    servers: Addresses
    ca_file: Path
    scale: Scale
    quick: bool
    repeats: int
    warmups: int = 1
    #: Seconds one run of one variant may take before the benchmark fails.
    limit: float = 120.0
    #: The server's certificate chain and key, for servers a case runs itself (13, 14).
    server_file: Path | None = None
    #: The CPU the servers are pinned to (None: not pinned).
    server_cpu: int | None = None

    def client_context(self) -> ssl.SSLContext:
        """A fresh client context trusting the benchmark CA."""
        return client_context(self.ca_file)

    async def compare(self, variants: Mapping[str, Variant]) -> dict[str, list[Run]]:
        """`compare` with this run's repeats, warm-ups and time limit."""
        return await compare(variants, repeats=self.repeats, warmups=self.warmups, limit=self.limit)
