"""What waits unread under a TLS channel, and telling session tickets from messages.

trio's `trio.SSLStream` reads the socket in chunks into a TLS buffer (an `ssl.MemoryBIO`)
and decrypts one record per read. So when a relay pushes a message right behind a reply
(in the same TCP segment), the reply's reader leaves the pushed record in that buffer,
still encrypted: neither the socket nor `ssl.SSLObject.pending` shows it, and the next
user of the channel would read it as their reply.

`TlsBuffers` stands in for the context when the `SSLStream` is made: it hands
``wrap_bio`` on to the real context and keeps the buffers, so that a checkout sees every
place where bytes can wait. When something does wait, `TlsBuffers.settle` tells what it
is. TLS 1.3 session tickets, which servers send whenever they like (OpenSSL-based ones
right after the handshake, some tens of milliseconds later), are TLS's own business:
settling processes them and the channel stays fit. Anything else (application data, a
close, a reset) leaves the channel unfit to lend.
"""

from __future__ import annotations

import os
import ssl
from typing import final

#: More than this arriving on an idle channel is not session tickets (a few hundred bytes
#: each), and is not read any further.
SETTLE_LIMIT = 64 * 1024


@final
class TlsBuffers:
    """The `ssl.SSLObject` under one `trio.SSLStream`, and its incoming buffer.

    Pass it where `trio.SSLStream` takes its context. trio (0.22 to 0.35 at least) calls
    only ``wrap_bio`` on it; anything else it might ask for is the real context's. The
    tests that prove a pushed record is found in TLS's buffer fail if trio ever stops
    passing its buffers through ``wrap_bio``.
    """

    __slots__ = ("_context", "_incoming", "_outgoing", "_tls")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._tls: ssl.SSLObject | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """`ssl.SSLContext.wrap_bio`, keeping what it is given."""
        self._incoming, self._outgoing = incoming, outgoing
        self._tls = self._context.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        return self._tls

    def __getattr__(self, name: str) -> object:
        return getattr(self._context, name)

    @property
    def incoming(self) -> ssl.MemoryBIO | None:
        """TLS's incoming buffer: bytes read off the socket that TLS has not processed
        (its ``pending``); None before ``wrap_bio``."""
        return self._incoming

    def settle(self, fd: int | None) -> bool:
        """Process what waits unread (in the buffer, and on socket ``fd`` if given);
        True if it was only TLS housekeeping, such as session tickets.

        Only for a channel nobody is reading: it reads the socket without blocking, and
        consumes what it decides on (a channel that is not clean is not lent again).
        """
        incoming, outgoing, tls = self._incoming, self._outgoing, self._tls
        if incoming is None or outgoing is None or tls is None:
            return False
        arrived = bytearray(incoming.read())
        while fd is not None:
            try:
                chunk = os.read(fd, SETTLE_LIMIT)
            except BlockingIOError:
                break
            except OSError:
                return False  # a reset, or the socket is gone
            if not chunk or len(arrived) + len(chunk) > SETTLE_LIMIT:
                return False  # end-of-file; or far more than tickets
            arrived += chunk
        if not _whole_records(arrived):
            return False  # half a record: it may be the start of a message
        incoming.write(bytes(arrived))
        try:
            tls.read(1)
        except ssl.SSLWantReadError:
            # Every record was processed and none carried data. A record that wants an
            # answer (a key update, a renegotiation) would have left one to send: leave
            # such a channel alone rather than answer behind trio's back.
            return not outgoing.pending
        except ssl.SSLError:
            return False  # a close_notify, an alert, garbage
        return False  # application data


def _whole_records(data: bytearray) -> bool:
    """Whether ``data`` is a run of complete TLS records (5-byte headers, then bodies)."""
    at, end = 0, len(data)
    while at + 5 <= end:
        at += 5 + (data[at + 3] << 8 | data[at + 4])
    return at == end
