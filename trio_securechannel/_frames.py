"""`FrameWatch`: a WebSocket channel's TLS stream, watched for frame boundaries.

trio-websocket reads the stream through this wrapper (a `trio.abc.Stream`, which its
public ``wrap_client_stream`` accepts), so the pool can tell from the frame headers going
by, without touching trio-websocket's internals, whether anything reached an idle
channel: a data message, part of one, a close frame, or part of a frame header.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import trio

_FIN = 0x80
_OPCODE = 0x0F
_CONTINUATION, _TEXT, _BINARY, _CLOSE = 0x0, 0x1, 0x2, 0x8


@final
class FrameWatch(trio.abc.Stream):
    """The TLS stream as trio-websocket uses it, watched for WebSocket frame headers.

    Received: the data messages that arrived (a message counts once its last frame's header
    has come), a message in progress, the relay's close frame, and part of a frame. A frame
    whose header came in one TLS record and whose rest has not come yet gives the reader no
    event, but it is something the relay sent: an idle channel holding part of a frame must
    not be lent. (Part of a TLS record cannot be seen at all; it is as if it arrived just
    after the checkout.) Sent: our close frame. And the end of the stream, either way.

    ``on_change`` is called when `ended`, `close_received` or `close_sent` becomes true.
    """

    def __init__(
        self, stream: trio.SSLStream[Any], on_change: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._on_change = on_change
        self._received = _FrameHeaders()
        self._sent = _FrameHeaders()
        self.messages_arrived = 0
        self.message_in_progress = False
        self.close_received = False
        self.close_sent = False
        self.closed_first = False  # our close frame went out before the relay's came
        self.ended = False  # end of stream, an error, or closed

    @property
    def mid_frame(self) -> bool:
        """True while part of a received frame is in (its header, or not all its payload)."""
        return self._received.mid_frame

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end()
            raise
        if data:
            self.watch(data)
        else:
            self._end()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        closing = any(first & _OPCODE == _CLOSE for first in self._sent.feed(data))
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end()
            raise
        if closing and not self.close_sent:
            self.close_sent = True
            self.closed_first = not self.close_received
            self._changed()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._end()  # after: whoever this wakes must not cut the close_notify short

    def watch(self, data: bytes | bytearray) -> None:
        """Take in received bytes (what `receive_some` does with each chunk it returns)."""
        closing = False
        for first in self._received.feed(data):
            opcode = first & _OPCODE
            if opcode in (_TEXT, _BINARY) or (opcode == _CONTINUATION and self.message_in_progress):
                if first & _FIN:
                    self.messages_arrived += 1
                    self.message_in_progress = False
                else:
                    self.message_in_progress = True
            elif opcode == _CLOSE:
                closing = True
        if closing and not self.close_received:
            self.close_received = True
            self._changed()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


@final
class _FrameHeaders:
    """One direction of a WebSocket connection, parsed as its bytes go by: the HTTP message
    of the upgrade (up to its blank line), then frames, of which only the headers are
    read (RFC 6455 5.2); payloads are counted past."""

    def __init__(self) -> None:
        self._in_http = True
        self._http_tail = b""  # the end of the HTTP message so far, to find its end
        self._header = bytearray()  # the current frame's header, while incomplete
        self._payload_left = 0

    @property
    def mid_frame(self) -> bool:
        return bool(self._header) or self._payload_left > 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Take the next bytes; return the first byte of each frame header they complete."""
        firsts: list[int] = []
        view = memoryview(data)
        if self._in_http:
            seen = self._http_tail + bytes(view)
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                self._http_tail = seen[-3:]
                return firsts
            self._in_http = False
            view = memoryview(seen)[end + 4 :]
        while view:
            if self._payload_left:
                taken = min(self._payload_left, len(view))
                self._payload_left -= taken
                view = view[taken:]
                continue
            if not self._header and len(view) >= 2 and len(view) >= _header_length(view):
                firsts.append(view[0])  # a whole header: the usual case
                self._payload_left = _payload_length(view)
                view = view[_header_length(view) :]
                continue
            self._header += view[:1]  # a header split between reads: a byte at a time
            view = view[1:]
            if len(self._header) >= 2 and len(self._header) == _header_length(self._header):
                firsts.append(self._header[0])
                self._payload_left = _payload_length(self._header)
                self._header.clear()
        return firsts


def _header_length(header: bytearray | memoryview) -> int:
    """RFC 6455 5.2: 2 bytes, a 16- or 64-bit extended length, a 4-byte mask key."""
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)


def _payload_length(header: bytearray | memoryview) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length
