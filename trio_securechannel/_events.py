"""Fan-out of pool events to subscribers that may be slow, or gone, without blocking.

Each subscriber reads from its own bounded trio memory channel. Publishing never waits:
when a subscriber's buffer is full its oldest event is dropped (and counted) to make room,
so a slow or absent reader costs a fixed amount of memory and never holds the pool up.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Generic, TypeVar, final

import trio

T = TypeVar("T")


@final
class EventStream(Generic[T]):
    """One subscription: ``async for event in stream``, ending when the pool closes.

    Use it as a context manager (``with pool.breaker_events() as events:``) or call
    `close` to unsubscribe.

    Attributes:
        dropped: Events discarded because this subscriber fell ``capacity`` events behind.
    """

    def __init__(self, bus: EventBus[T], capacity: int) -> None:
        self._bus = bus
        self._send, self._receive = trio.open_memory_channel[T](capacity)
        self.dropped = 0

    def offer(self, event: T) -> None:
        """Queue ``event``, dropping the oldest queued one if the buffer is full."""
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._receive.receive_nowait()
            self.dropped += 1
            self._send.send_nowait(event)

    def end(self) -> None:
        """No more events will come: iteration stops once the buffer is drained."""
        self._send.close()

    def close(self) -> None:
        """Unsubscribe and discard whatever is buffered."""
        self._bus.unsubscribe(self)
        self._send.close()
        self._receive.close()

    def __aiter__(self) -> EventStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def __enter__(self) -> EventStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@final
class EventBus(Generic[T]):
    """Publishes events to every current subscriber; ends their streams on `close`."""

    def __init__(self, capacity: int = 64) -> None:
        self._capacity = capacity
        # Weak: a subscriber that stops iterating without closing its stream (a `break` out
        # of ``async for``) must not stay subscribed, and buffering, forever.
        self._streams: weakref.WeakSet[EventStream[T]] = weakref.WeakSet()
        self._closed = False

    def subscribe(self) -> EventStream[T]:
        stream = EventStream(self, self._capacity)
        if self._closed:
            stream.end()
        else:
            self._streams.add(stream)
        return stream

    def unsubscribe(self, stream: EventStream[T]) -> None:
        self._streams.discard(stream)

    def publish(self, event: T) -> None:
        for stream in list(self._streams):
            stream.offer(event)

    def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.end()
        self._streams.clear()
