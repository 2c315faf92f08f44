"""The pool's books: which channels are idle, in use or being opened, and who waits.

Pure synchronous state, no I/O (as httpcore keeps its connection assignment apart from its
network calls): the pool calls these methods and does the awaiting around them. Every
method keeps one invariant: ``len(idle) + len(in_use) + opening <= max_connections``.

Handoff is direct: a channel given back, or a slot freed, goes to the longest-waiting task
before anyone else can take it, so waiters are served in FIFO order and nobody barges.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final, final

import outcome
import trio

from ._channel import Channel


class Grant(enum.Enum):
    """What a checkout may be granted besides an idle channel."""

    OPEN = "permission to open a new channel in a reserved slot"
    CLOSED = "the pool closed while waiting"


OPEN: Final = Grant.OPEN
CLOSED: Final = Grant.CLOSED


@final
class Waiter:
    """A task parked in line for a channel or a slot; granting one reschedules it."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task

    def grant(self, grant: Channel | Grant) -> None:
        trio.lowlevel.reschedule(self.task, outcome.Value(grant))


@final
class Slots:
    """Idle channels (a LIFO stack), channels in use, slots being opened, FIFO waiters."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        # Most recently used on the right: reusing the warmest channel keeps few channels
        # busy, so the surplus ages out through idle_timeout (and the oldest are reaped
        # first, from the left).
        self.idle: deque[Channel] = deque()
        self.in_use: set[Channel] = set()
        self.opening = 0
        self.waiters: deque[Waiter] = deque()
        self.closed = False

    @property
    def open_count(self) -> int:
        """Channels that exist: idle or in use."""
        return len(self.idle) + len(self.in_use)

    @property
    def total(self) -> int:
        """Everything counted against ``max_connections``, slots being opened included."""
        return len(self.idle) + len(self.in_use) + self.opening

    def try_take(self) -> Channel | Grant | None:
        """Take the warmest idle channel, else a slot to open one; None means wait."""
        if self.closed:
            return CLOSED
        if self.waiters:
            return None  # others are in line first
        if self.idle:
            channel = self.idle.pop()
            self.in_use.add(channel)
            return channel
        if self.total < self.max_connections:
            self.opening += 1
            return OPEN
        return None

    def reserve_spare(self) -> bool:
        """Reserve a slot to open a warm spare channel, if nobody needs it more."""
        if self.closed or self.waiters or self.total >= self.max_connections:
            return False
        self.opening += 1
        return True

    def reserve_fresh(self) -> tuple[bool, Channel | None]:
        """Reserve a slot for a brand-new channel even if idle ones exist (a breaker trial).

        When idle channels fill every slot, the longest-idle one is evicted to make room
        and returned for the caller to close. False when every slot is lent out.
        """
        evicted = None
        if not self.closed and self.total >= self.max_connections and self.idle:
            evicted = self.idle.popleft()
        if self.closed or self.total >= self.max_connections:
            return False, evicted
        self.opening += 1
        return True, evicted

    def enqueue(self, task: trio.lowlevel.Task) -> Waiter:
        waiter = Waiter(task)
        self.waiters.append(waiter)
        return waiter

    def leave_line(self, waiter: Waiter) -> None:
        """A waiter gave up (cancelled, timed out) before anything was granted to it."""
        self.waiters.remove(waiter)

    def opened(self, channel: Channel) -> None:
        """A slot being opened became ``channel``, held by whoever opened it."""
        self.opening -= 1
        self.in_use.add(channel)

    def open_failed(self) -> None:
        """A slot being opened came to nothing: pass it on."""
        self.opening -= 1
        self._pass_on_free_slot()

    def give_back(self, channel: Channel) -> None:
        """A held channel fit for reuse: to the first waiter, else onto the idle stack.

        Only while the pool is open; after `close` held channels are forgotten and closed.
        """
        if self.waiters:
            self.waiters.popleft().grant(channel)
        else:
            self.in_use.remove(channel)
            self.idle.append(channel)

    def forget(self, channel: Channel) -> None:
        """A held channel leaves the pool (the caller closes it); its slot passes on."""
        self.in_use.remove(channel)
        self._pass_on_free_slot()

    def evict_idle(self, channel: Channel) -> None:
        """An idle channel leaves the pool (the caller closes it); its slot passes on."""
        self.idle.remove(channel)
        self._pass_on_free_slot()

    def swap_dead(self, channel: Channel) -> Channel | Grant:
        """A held channel turned out dead: keep the holder's turn, give it another or a slot."""
        self.in_use.remove(channel)
        if self.closed:
            return CLOSED
        if self.idle:
            replacement = self.idle.pop()
            self.in_use.add(replacement)
            return replacement
        self.opening += 1
        return OPEN

    def trade_for_slot(self, channel: Channel) -> None:
        """Give up a held channel (the caller closes it) but keep its slot, to open anew."""
        self.in_use.remove(channel)
        self.opening += 1

    def close(self) -> list[Channel]:
        """Stop lending: wake every waiter with CLOSED and hand back the idle channels."""
        self.closed = True
        while self.waiters:
            self.waiters.popleft().grant(CLOSED)
        idle = list(self.idle)
        self.idle.clear()
        return idle

    def _pass_on_free_slot(self) -> None:
        if self.waiters and not self.closed:
            self.opening += 1
            self.waiters.popleft().grant(OPEN)
