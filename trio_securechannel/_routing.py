"""Choosing a relay: the power of two choices on load and latency, with failover.

A pool lends each kind of channel (raw TLS, ``wss://``) from its own `Router`. With one
relay there is nothing to choose and the lease goes straight to it; with several, a
checkout tries the better of two random candidates first, then the rest, and a failure
before anything was sent moves on to the next relay, so callers see no error while any
relay works.
"""

from __future__ import annotations

import random
from typing import final

import trio
from trio.lowlevel import enable_ki_protection

from ._channel import Channel
from ._errors import CircuitOpen, ConnectError, PoolClosed
from ._relay import Relay

#: The share of checkouts that take the other of the two choices, so that every relay's
#: latency keeps being measured.
EXPLORE = 0.05


@final
class Router:
    """Checkouts across the relays of one kind.

    Attributes:
        relays: The relays, in the order configured.
        only: The relay, when there is just one (the lease's fast path), else None.
    """

    def __init__(self, relays: list[Relay]) -> None:
        self.relays = relays
        self.only = relays[0] if len(relays) == 1 else None
        self._names = ", ".join(str(relay.endpoint) for relay in relays)
        self._random = random.Random()
        for relay in relays:
            relay.learns_latency = len(relays) > 1  # latency matters only for choosing

    @enable_ki_protection
    async def checkout(self) -> tuple[Relay, Channel]:
        """Check out from the best relay that can serve at once, else wait at the best.

        The better of two random relays is asked first (the fast path: a warm channel
        there); then, in order of preference, relays that can serve at once (a warm
        channel, or room to open one) are tried before anyone waits in line, and a
        failure before anything was sent (no channel could be opened, the breaker opened
        meanwhile) moves on to the next relay. When none served, the checkout waits its
        turn at the full relays, best first, for up to ``acquire_timeout`` in all: a
        relay that refuses never hides one that is only busy.

        Raises:
            CircuitOpen: Every relay's breaker is open (counted once, on the relay back
                the soonest).
            And those of `Relay.checkout`.
        """
        relays = self.relays
        if relays[0].closed:
            raise PoolClosed(self._names)
        pair = self._two_choices()
        channel = pair[0].try_lend()
        if channel is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return pair[0], channel
        now = trio.current_time()
        candidates = [relay for relay in relays if relay.admits(now)]
        if not candidates:
            soonest = min(relays, key=lambda relay: relay.retry_after(now))
            error = soonest.refuse(now)
            raise CircuitOpen(self._names, error.retry_after)
        ranked = [relay for relay in pair if relay in candidates]
        ranked += sorted((r for r in candidates if r not in pair), key=lambda r: r.load)
        failures: list[ConnectError | CircuitOpen] = []
        full: list[Relay] = []
        for relay in ranked:  # in order of preference, the first that serves at once
            channel = relay.try_lend()
            if channel is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return relay, channel
            if not relay.has_room():
                full.append(relay)
                continue
            try:
                return relay, await relay.checkout()  # reuses or opens: no waiting
            except (ConnectError, CircuitOpen) as exc:
                failures.append(exc)
        # Nothing served at once: wait in line at the full relays, best first, within
        # one acquire_timeout in all. A wait that ends in a failed connect moves on too.
        began = trio.current_time()
        for relay in full:
            try:
                return relay, await relay.checkout(began=began)
            except (ConnectError, CircuitOpen) as exc:
                failures.append(exc)
        connect_errors = [exc for exc in failures if isinstance(exc, ConnectError)]
        if connect_errors:
            raise connect_errors[-1]
        raise min(failures, key=lambda exc: getattr(exc, "retry_after", 0.0))

    def _two_choices(self) -> tuple[Relay, Relay]:
        """Power of two choices: two random relays, the one with the lower load first.

        Ties go either way at random, and now and then the other of the two is taken, so
        a relay that looked slow once is measured again rather than starved.
        """
        relays, draw = self.relays, self._random.random
        count = len(relays)
        first = int(draw() * count)
        second = int(draw() * (count - 1))
        second += second >= first
        better, worse = relays[first], relays[second]
        better_load, worse_load = better.load, worse.load
        if worse_load < better_load or (worse_load == better_load and draw() < 0.5):
            better, worse = worse, better
        if draw() < EXPLORE:
            better, worse = worse, better
        return better, worse
