"""The pool's books: which channels are idle, in use or being opened, and who waits.

Pure synchronous state, no I/O (as httpcore keeps its connection assignment apart from its
network calls): the planner calls these methods and the relay does the awaiting around
them. Every method keeps one invariant: ``len(idle) + len(in_use) + opening <=
max_connections``.

A slot being opened is a `Reservation`: it is filled with a channel or released, exactly
once, and ``with reservation:`` releases it on every exit that did not fill it, so no error
path frees a slot by hand (bb8's ``Approval``).

Handoff is direct: a channel given back, or a slot freed, goes to the longest-waiting task
before anyone else can take it, so waiters are served in FIFO order and nobody barges.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Final, TypeAlias, final

from trio.lowlevel import enable_ki_protection

from ._channel import Channel


class Closing(enum.Enum):
    """What a waiter is granted when the pool closes under it."""

    CLOSED = "the pool closed while waiting"


CLOSED: Final = Closing.CLOSED

#: What a waiter is woken with: a channel to use, a slot to open one in, or the news that
#: the pool closed. Whoever is woken owns the channel or the reservation.
Grant: TypeAlias = "Channel | Reservation | Closing"


@final
class Waiter:
    """Someone in line for a channel or a slot; `wake` hands it what it was granted."""

    __slots__ = ("wake",)

    def __init__(self, wake: Callable[[Grant], object]) -> None:
        self.wake = wake


@final
class Reservation:
    """A slot counted as being opened: filled with a channel, or released, exactly once.

    ``with reservation:`` releases it on any exit that did not `fill` it, passing the slot
    to the next waiter.
    """

    __slots__ = ("_books", "settled")

    def __init__(self, books: Slots) -> None:
        self._books = books
        self.settled = False

    @enable_ki_protection
    def fill(self, channel: Channel) -> None:
        """The slot became ``channel``, held by whoever opened it."""
        assert not self.settled, "a reservation is filled or released once"
        self.settled = True
        self._books.opened(channel)

    @enable_ki_protection
    def release(self) -> None:
        """Nothing came of the slot: pass it on (a no-op once settled)."""
        if not self.settled:
            self.settled = True
            self._books.open_failed()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@final
class Slots:
    """Idle channels (a LIFO stack), channels in use, slots being opened, FIFO waiters.

    The methods that change the books are protected from Ctrl-C (as trio's own locks
    are): a KeyboardInterrupt cannot land half-way through and leave them unbalanced.
    """

    def __init__(
        self, max_connections: int, *, on_slot_freed: Callable[[], object] | None = None
    ) -> None:
        self.max_connections = max_connections
        # Told whenever a channel or a slot leaves the books (the relay wakes whoever
        # waits for that: its shutdown, its spare keeper).
        self._on_slot_freed = on_slot_freed
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

    @property
    def full(self) -> bool:
        return self.total >= self.max_connections

    @enable_ki_protection
    def take_idle(self) -> Channel | None:
        """Lend the warmest idle channel, if there is one."""
        if not self.idle:
            return None
        channel = self.idle.pop()
        self.in_use.add(channel)
        return channel

    @enable_ki_protection
    def reserve(self) -> Reservation | None:
        """A free slot to open a channel in, if there is one."""
        if self.closed or self.full:
            return None
        self.opening += 1
        return Reservation(self)

    @enable_ki_protection
    def enqueue(self, wake: Callable[[Grant], object]) -> Waiter:
        waiter = Waiter(wake)
        self.waiters.append(waiter)
        return waiter

    @enable_ki_protection
    def leave_line(self, waiter: Waiter) -> None:
        """A waiter gave up (cancelled, timed out) before anything was granted to it."""
        self.waiters.remove(waiter)

    def opened(self, channel: Channel) -> None:
        """A slot being opened became ``channel`` (through `Reservation.fill`)."""
        self.opening -= 1
        self.in_use.add(channel)

    def open_failed(self) -> None:
        """A slot being opened came to nothing (through `Reservation.release`): pass it on."""
        self.opening -= 1
        self._pass_on_free_slot()

    @enable_ki_protection
    def give_back(self, channel: Channel) -> None:
        """A held channel fit for reuse: to the first waiter, else onto the idle stack."""
        if self.waiters:
            self.waiters.popleft().wake(channel)
        else:
            self.in_use.remove(channel)
            self.idle.append(channel)

    @enable_ki_protection
    def forget(self, channel: Channel) -> None:
        """A held channel leaves the pool (the caller closes it); its slot passes on."""
        self.in_use.remove(channel)
        self._pass_on_free_slot()

    @enable_ki_protection
    def evict_idle(self, channel: Channel) -> None:
        """An idle channel leaves the pool (the caller closes it); its slot passes on."""
        self.idle.remove(channel)
        self._pass_on_free_slot()

    @enable_ki_protection
    def swap_dead(self, channel: Channel) -> Channel | Reservation:
        """A held channel turned out unfit: keep the holder's turn, with another idle
        channel or its slot to open a new one in (the caller closes the dead one)."""
        self.in_use.remove(channel)
        if self.idle:
            replacement = self.idle.pop()
            self.in_use.add(replacement)
            return replacement
        self.opening += 1
        return Reservation(self)

    @enable_ki_protection
    def close(self) -> list[Channel]:
        """Stop lending: wake every waiter with CLOSED and hand back the idle channels."""
        self.closed = True
        while self.waiters:
            self.waiters.popleft().wake(CLOSED)
        idle = list(self.idle)
        self.idle.clear()
        return idle

    def _pass_on_free_slot(self) -> None:
        if self.waiters and not self.closed:
            self.opening += 1
            self.waiters.popleft().wake(Reservation(self))
        if self._on_slot_freed is not None:
            self._on_slot_freed()
