"""``async with pool.connection() as channel``: one checkout and its end."""

from __future__ import annotations

from types import TracebackType
from typing import Generic, TypeVar, final

import trio
from trio.lowlevel import enable_ki_protection

from ._channel import NO_DEADLINE, Channel
from ._relay import Relay
from ._routing import Router

ChannelT = TypeVar("ChannelT", bound=Channel)


@final
class Lease(Generic[ChannelT]):
    """One checkout from ``router``'s relays, whose channels are all ``ChannelT``, whose
    relay must answer within ``timeout`` seconds of it (None: no limit).

    The block's own exception, if any, always leaves unchanged (never in a group).
    Entering and leaving are protected from Ctrl-C, as trio's `trio.Semaphore.acquire`
    is: a KeyboardInterrupt between the books' decision and the lease holding its result
    would leak a slot, so it waits for the next checkpoint instead.
    """

    __slots__ = ("_channel", "_relay", "_router", "_timeout")

    def __init__(self, router: Router, timeout: float | None) -> None:
        self._router = router
        self._timeout = timeout
        self._relay: Relay | None = None
        self._channel: Channel | None = None

    @enable_ki_protection
    async def __aenter__(self) -> ChannelT:
        if self._channel is not None:
            raise RuntimeError("a pool connection lease cannot be entered twice")
        # As trio.Semaphore.acquire does: a cancellation point first, then either the
        # synchronous fast path and a shielded yield, or the general path's own waits.
        await trio.lowlevel.checkpoint_if_cancelled()
        relay = self._router.only
        if relay is None:
            relay, channel = await self._router.checkout()
        else:
            lent = relay.try_lend()
            if lent is None:
                channel = await relay.checkout()
            else:
                channel = lent
                await trio.lowlevel.cancel_shielded_checkpoint()
        self._relay, self._channel = relay, channel
        timeout = self._timeout
        if timeout is None:
            channel.deadline = NO_DEADLINE
        else:
            channel.deadline = trio.current_time() + timeout
            channel.request_timeout = timeout
            if channel.trial is not None:
                relay.trial_lent(channel)
        return channel  # type: ignore[return-value]  # relays of its kind lend only those

    @enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._relay is not None
        assert self._channel is not None
        # Closes, if any, run in the pool's nursery: leaving the block never waits on them.
        self._relay.check_in(self._channel, exc)
