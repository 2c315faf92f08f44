"""The pool's figures, each counted once.

A channel counts its own errors, bytes and round trips while it lives. When it leaves the
pool its figures are folded in here, and so are the latency windows a rotation drops. So
every total is "what is gone plus what is live", never counted twice, and `status()` and
``/metrics`` read the very same numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import final

from ._channel import Channel
from ._latency import Histogram, RotatingHistogram


@final
class PoolStats:
    """Counters and latency histograms of one pool."""

    def __init__(self, now: float, rotation_interval: float) -> None:
        self.rotation_interval = rotation_interval
        self.opened_total = 0
        self.closed_by_reason: Counter[str] = Counter()
        self.exhausted_total = 0
        self.past_errors: Counter[str] = Counter()  # of channels gone, and failed opens
        self.past_bytes_sent = 0
        self.past_bytes_received = 0
        self.handshakes = RotatingHistogram(now)
        self.acquire_waits = RotatingHistogram(now)
        # Checkouts served without waiting, since the last rotation: a plain count on the
        # fast path, which the acquire-wait figures below include as zero-second waits.
        self.zero_waits = 0
        # Cumulative figures dropped by rotations (and by closed channels' windows).
        self.past_handshakes = Histogram()
        self.past_acquire_waits = Histogram()
        self.past_round_trips = Histogram()

    # -- events ---------------------------------------------------------------------------

    def channel_opened(self, channel: Channel) -> None:
        self.opened_total += 1
        self.handshakes.observe(channel.handshake_seconds)

    def connect_failed(self, phase: str) -> None:
        self.past_errors[phase] += 1

    def channel_closed(self, channel: Channel, reason: str) -> None:
        """Fold a departing channel's figures in. Call once per channel."""
        self.closed_by_reason[reason] += 1
        self.past_errors.update(channel.errors)
        self.past_bytes_sent += channel.bytes_sent
        self.past_bytes_received += channel.bytes_received
        for window in channel.round_trips.windows():
            self.past_round_trips.merge(window)

    def rotate(self, now: float, channels: Iterable[Channel]) -> None:
        """Rotate every window that is due, the pool's and its live channels'."""
        interval = self.rotation_interval
        if self.zero_waits:
            self.acquire_waits.current.observe_zeros(self.zero_waits)
            self.zero_waits = 0
        for rotating, past in (
            (self.handshakes, self.past_handshakes),
            (self.acquire_waits, self.past_acquire_waits),
        ):
            dropped = rotating.rotate_if_due(now, interval)
            if dropped is not None:
                past.merge(dropped)
        for channel in channels:
            dropped = channel.round_trips.rotate_if_due(now, interval)
            if dropped is not None:
                self.past_round_trips.merge(dropped)

    # -- totals: gone plus live -----------------------------------------------------------

    def errors(self, live: Iterable[Channel]) -> Counter[str]:
        errors = self.past_errors.copy()
        for channel in live:
            errors.update(channel.errors)
        return errors

    def bytes_sent(self, live: Iterable[Channel]) -> int:
        return self.past_bytes_sent + sum(channel.bytes_sent for channel in live)

    def bytes_received(self, live: Iterable[Channel]) -> int:
        return self.past_bytes_received + sum(channel.bytes_received for channel in live)

    def acquire_waits_recent(self) -> Histogram:
        recent = self.acquire_waits.recent()
        recent.observe_zeros(self.zero_waits)
        return recent

    def acquire_waits_cumulative(self) -> Histogram:
        total = self.cumulative(self.acquire_waits, self.past_acquire_waits)
        total.observe_zeros(self.zero_waits)
        return total

    def cumulative(self, rotating: RotatingHistogram, past: Histogram) -> Histogram:
        total = Histogram()
        total.merge(past)
        for window in rotating.windows():
            total.merge(window)
        return total

    def round_trips_recent(self, live: Iterable[Channel]) -> Histogram:
        recent = Histogram()
        for channel in live:
            for window in channel.round_trips.windows():
                recent.merge(window)
        return recent
