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

    async def checkout(self) -> tuple[Relay, Channel]:
        """Check out from the best relay that can serve at once, else wait at the best.

        Relays that can serve at once (a warm channel, or room to open one) are tried
        before anyone waits in line; a failure before anything was sent (no channel could
        be opened, the breaker opened meanwhile) moves on to the next relay. Only when
        every relay is full does the checkout wait, on the best one, for up to
        ``acquire_timeout``.

        Raises:
            CircuitOpen: Every relay's breaker is open (counted once, on the relay back
                the soonest).
            And those of `Relay.checkout`.
        """
        relays = self.relays
        if relays[0].closed:
            raise PoolClosed(self._names)
        now = trio.current_time()
        candidates = [relay for relay in relays if relay.admits(now)]
        if not candidates:
            soonest = min(relays, key=lambda relay: relay.retry_after(now))
            error = soonest.refuse(now)
            raise CircuitOpen(self._names, error.retry_after)
        ranked = self.ranked(candidates)
        failures: list[ConnectError | CircuitOpen] = []
        for relay in ranked:  # in order of preference, the first that serves at once
            channel = relay.try_lend()
            if channel is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return relay, channel
            if relay.has_room():
                try:
                    return relay, await relay.checkout()  # reuses or opens: no waiting
                except (ConnectError, CircuitOpen) as exc:
                    failures.append(exc)
        if not failures:  # every relay is full: wait in line at the best one
            return ranked[0], await ranked[0].checkout()
        connect_errors = [exc for exc in failures if isinstance(exc, ConnectError)]
        if connect_errors:
            raise connect_errors[-1]
        raise min(failures, key=lambda exc: getattr(exc, "retry_after", 0.0))

    def ranked(self, candidates: list[Relay]) -> list[Relay]:
        """Power of two choices: the better of two random candidates, then the rest.

        Ties go either way at random, and now and then the other of the two is taken, so
        a relay that looked slow once is measured again rather than starved.
        """
        draw = self._random.random
        pair = self._random.sample(candidates, 2) if len(candidates) > 2 else list(candidates)
        pair.sort(key=lambda relay: (relay.load, draw()))
        if len(pair) == 2 and draw() < EXPLORE:
            pair.reverse()
        rest = sorted((c for c in candidates if c not in pair), key=lambda relay: relay.load)
        return [*pair, *rest]
