"""The faults a `LoopbackRelay` can be switched to, while it runs."""

from __future__ import annotations

import enum


class Fault(str, enum.Enum):
    """How the relay treats connections; set ``relay.fault`` at any time.

    Faults of the accept and the handshake (``REFUSE`` to ``DROP_AFTER_HANDSHAKE``) meet new
    connections; the others also meet connections already open, a read already waiting
    included. Latency, replies in pieces, pushes and idle closes are separate settings
    (``latency``, ``piece_size``, `~LoopbackRelay.push`, ``idle_close_after``) that combine
    with any fault.
    """

    #: No fault: the relay echoes, or runs its handler.
    NONE = "none"
    #: Connects are refused, as nothing listens (the port is kept for when the fault ends).
    REFUSE = "refuse"
    #: Accept the TCP connection, then reset it (RST), as a crashing relay's kernel does.
    RESET_ON_ACCEPT = "reset_on_accept"
    #: Accept the TCP connection, then close it (FIN) before any TLS.
    CLOSE_ON_ACCEPT = "close_on_accept"
    #: Accept and read, never answer the TLS handshake (a black hole behind a balancer).
    NO_TLS = "no_tls"
    #: Complete the TLS handshake, then close without a word.
    DROP_AFTER_HANDSHAKE = "drop_after_handshake"
    #: Complete the TLS handshake, then take every request and answer none (over ``wss://``:
    #: the upgrade request is read, never answered).
    HANG_AFTER_HANDSHAKE = "hang_after_handshake"
    #: Complete the TLS handshake, then read nothing more: the client's sends fill the buffers.
    STOP_READING = "stop_reading"
    #: Send half of the next reply, then reset the connection.
    RESET_MID_REPLY = "reset_mid_reply"
    #: Answer a ``wss://`` upgrade with 403 Forbidden (for WebSocket relays only).
    REJECT_UPGRADE = "reject_upgrade"
