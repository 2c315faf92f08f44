"""The exceptions a pool raises: one base class, a small flat tree under it.

I/O errors on a channel already handed out are trio's own (`trio.BrokenResourceError`,
`trio.ClosedResourceError`), as the `trio.abc.Stream` contract requires.
"""

from __future__ import annotations

from typing import Any, final


class SecureChannelError(Exception):
    """Base class of every error trio_securechannel raises on its own account.

    Each one names its relay in ``endpoint`` and in its message, and pickles intact (it is
    rebuilt from its attributes).
    """

    _args: tuple[object, ...] = ()

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Rebuild from the constructor's arguments, not the message: these errors cross
        # process boundaries (multiprocessing, logging handlers) intact.
        if not self._args:
            return super().__reduce__()
        return (type(self), self._args, self.__dict__)


@final
class PoolExhausted(SecureChannelError):
    """All ``max_connections`` channels are in use and none came free in time.

    Raised at once when ``acquire_timeout`` is 0, or when the FIFO wait for a channel runs
    out.

    Attributes:
        endpoint (str): The relay (in a pool of several, the last one waited on).
        max_connections (int): The pool's ``max_connections``, all of them in use.
        waited (float): Seconds the checkout could wait for one to come free, its
            ``acquire_timeout`` (0: it was not allowed to wait).
    """

    def __init__(self, endpoint: str, max_connections: int, waited: float) -> None:
        self._args = (endpoint, max_connections, waited)
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.waited = waited
        how = "no wait allowed" if waited == 0 else f"waited {waited:g}s"
        super().__init__(
            f"Connection pool exhausted: all {max_connections} channels to {endpoint} are in use"
            f" ({how}); raise max_connections or acquire_timeout, or return channels sooner"
        )


@final
class ConnectError(SecureChannelError):
    """Opening a channel failed: TCP connect, TLS handshake, pinned key, WebSocket upgrade,
    ``setup`` or ``connect_timeout``.

    ``__cause__`` keeps the underlying error (an `OSError`, an `ssl.SSLError` such as
    `ssl.SSLCertVerificationError`, ...) except for timeouts, which have none.

    Attributes:
        endpoint (str): The relay, as ``host:port`` (or its ``wss://`` URL).
        phase (str): Where it failed: ``"tcp"`` (connect, DNS), ``"tls"`` (handshake, certificate),
            ``"pin"`` (a pinned relay showed another public key), ``"websocket"`` (the
            upgrade of a ``wss://`` channel was refused or garbled), ``"setup"`` (the
            ``setup`` exchange failed or ran out of time; its error is the ``__cause__``),
            ``"timeout"`` (``connect_timeout`` ran out) or ``"dropped"`` (the relay hung up,
            or spoke unasked, right after the handshake: seen by the spare keeper, which
            logs it, never by a checkout).
        reason (str): One line saying what went wrong (the message, without the relay).
    """

    def __init__(self, endpoint: str, phase: str, reason: str) -> None:
        self._args = (endpoint, phase, reason)
        self.endpoint = endpoint
        self.phase = phase
        self.reason = reason
        super().__init__(f"cannot open a secure channel to {endpoint}: {reason}")


@final
class PoolClosed(SecureChannelError):
    """The pool is shutting down or has shut down; it hands out no more channels.

    Attributes:
        endpoint (str): The pool's relay (for a pool of several, its relays, joined by
            ``", "``).
    """

    def __init__(self, endpoint: str) -> None:
        self._args = (endpoint,)
        self.endpoint = endpoint
        super().__init__(f"the pool for {endpoint} is closed; open a new one with open_pool()")


@final
class CircuitOpen(SecureChannelError):
    """The relay's circuit breaker is open: no connection is attempted until it cools down.

    Attributes:
        endpoint (str): The relay (for a pool of several, its relays, joined by ``", "``).
        retry_after (float): Seconds until the breaker lets a trial checkout through.
    """

    def __init__(self, endpoint: str, retry_after: float) -> None:
        self._args = (endpoint, retry_after)
        self.endpoint = endpoint
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker for {endpoint} is open after repeated failures;"
            f" retry in {retry_after:.3g}s"
        )


@final
class RequestTimeout(SecureChannelError, TimeoutError):
    """A lent channel's relay did not answer within the checkout's time limit
    (``request_timeout``, or the ``timeout`` given to the checkout).

    Raised by the channel call that was waiting (a receive, a send the relay would not
    take). The channel is discarded, and the relay is held responsible: counted once as an
    error of kind ``"timeout"``, and as a failure by its circuit breaker. A cancellation of
    your own (``trio.fail_after`` around the block) is not this: it blames nobody.

    Attributes:
        endpoint (str): The relay.
        timeout (float): The limit, in seconds from the checkout.
    """

    def __init__(self, endpoint: str, timeout: float) -> None:
        self._args = (endpoint, timeout)
        self.endpoint = endpoint
        self.timeout = timeout
        super().__init__(
            f"no reply from {endpoint} within the request timeout of {timeout:g}s"
            " (counted against the relay; the channel was discarded); raise"
            " request_timeout, or pass timeout=math.inf to a checkout that waits on purpose"
        )


@final
class ProtocolError(SecureChannelError):
    """A relay broke the message framing or the protocol spoken over a channel: a line
    longer than ``max_line_length``, a reply that is not what the protocol allows.

    Raised by the call that read it. The channel is discarded and the relay is held
    responsible (counted once as an error, and as a failure by its circuit breaker).

    Attributes:
        endpoint (str): The relay.
        reason (str): One line saying what was wrong.
    """

    def __init__(self, endpoint: str, reason: str) -> None:
        self._args = (endpoint, reason)
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"{endpoint} broke the protocol: {reason} (the channel was discarded)")
