"""A soak: three relays, a dozen callers, faults switched at random; every invariant holds,
and file descriptors and memory stay flat.

Three TLS relays of our own on 127.0.0.1 and one pool over them. Twelve workers check
channels out in a loop and send a payload unique to the call (up to 40 KB, so replies span
several TLS records); now and then they cancel themselves mid-request, raise an error of
their own inside the block, or hold the channel a while. After a warm-up (a tenth of the
run), a chaos task switches faults on random relays every 50-300 ms and puts them back:
hung, deaf, silent, refusing, hanging up, dropping every session, slow, pushing data unasked
behind each reply, sending TLS tickets late, closing idle connections, resetting every
connection, or stopping and coming back on the same port; and it pushes messages to every
connection of a relay now and then. Then the relays heal.

What it asserts (nothing about speed, so a slow machine only makes it prove less):

- no caller ever reads a byte that is not its own reply (or a push that arrived while it
  held the channel): not another caller's reply, not a push that waited on an idle channel;
- at every scheduling step each relay's books hold at most ``max_connections``, and every
  sample of the process's sockets (ten a second) finds no more connections to a relay
  than its books count plus the closes still under way;
- only the errors a caller can expect come out of a checkout, each counted once; a channel
  that saw an error or a cancellation is closed, never pooled again;
- after the relays heal every breaker closes, nothing is in use, opening or waiting, the
  open channels are exactly ``opened_total - closed_total``, and ``max_connections``
  checkouts at once succeed on every relay;
- file descriptors and traced memory (tracemalloc) are flat between two quiet moments,
  after the warm-up and after the chaos; leaving the pool closes every socket it had, and
  stopping the relays gives back every descriptor.

A summary goes to the terminal whether the test passes or fails (round trips, outcomes,
faults, closes by reason, errors by kind, descriptors and memory). The RSS figure and the
relays' own counters (``max_active``) are reported, not asserted: the allocator keeps what
the chaos peaked at, and a deaf relay's connections linger on its side until it is reset.

Environment:

- ``SOAK_SECONDS``: how long the faults go on (default 60: the test then takes about 70 s;
  CI runs the default). Try ``SOAK_SECONDS=600`` locally for a longer soak.
- ``SOAK_SEED``: replay a run's random choices (printed at the start and in the summary).
  Timing still differs between runs, so a replay makes the same choices, not the same
  interleaving.

Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import socket
import ssl
import tracemalloc
from array import array
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Set
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import new_relay
from helpers import books, wait_until

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors and sockets in /proc"
)

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
WORKERS = 12
RELAYS = 3
MAX_CONNECTIONS = 4
OPTIONS: dict[str, Any] = {
    "max_connections": MAX_CONNECTIONS,
    "min_idle": 2,
    "request_timeout": 0.3,
    "connect_timeout": 0.5,
    "acquire_timeout": 1.0,
    "breaker_failure_threshold": 3,
    "breaker_cooldown": 0.5,
    "cleanup_interval": 0.2,
    "idle_timeout": 1.0,
    "max_lifetime": 5.0,
    "max_latency_ms": 200,
    "shutdown_timeout": 1.0,
    "histogram_rotation_interval": 5.0,  # rotations happen during the soak too
}
WARM_UP = max(1.0, 0.1 * SECONDS)
#: At most this many relays have a lasting fault at once (a pushed message or a reset
#: may hit any of them at any time).
MAX_FAULTY = 2
#: Traced memory may grow this much between the warm-up and the end of the chaos, in
#: all and in trio_securechannel's own code. A healthy run stays within a few hundred
#: KiB and a few tens of KiB; a channel kept after it closed costs about 5 KiB (2.1 MiB,
#: 1.1 MiB of it the library's, over 20 s), its latency histogram alone about 1 KiB
#: (0.4 MiB over 20 s).
MEMORY_BOUND = 2 * 2**20
OWN_MEMORY_BOUND = 256 * 2**10
#: What a checkout may end in, besides success, while relays misbehave.
EXPECTED_ERRORS = (sc.ConnectError, sc.CircuitOpen, sc.PoolExhausted, sc.RequestTimeout)
#: No checkout, from the lease to its last reply, may take longer than this (a hang).
CHECKOUT_BOUND = 15.0

# Payloads are ASCII; pushes are framed by 0xff bytes, so a reader can tell them apart.
MARK = 0xFF
ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: A push to a connection counts as "waiting" for a later checkout only if it was sent
#: this long before that checkout began (loopback delivers at once, or
#: as soon as the kernel's softirq work runs on a busy machine).
PUSH_MARGIN = 0.02

#: The faults of the testing kit's relay that the chaos switches on, by name.
MODES = {
    "hang": Fault.HANG_AFTER_HANDSHAKE,
    "drop_after_handshake": Fault.DROP_AFTER_HANDSHAKE,
    "refuse": Fault.REFUSE,
    "hangup": Fault.CLOSE_ON_ACCEPT,
    "reset_on_accept": Fault.RESET_ON_ACCEPT,
    "silent": Fault.NO_TLS,
    "deaf": Fault.STOP_READING,
    "reset_mid_reply": Fault.RESET_MID_REPLY,
}
INSTANT_FAULTS = ("reset", "push")
FAULTS = (*MODES, *INSTANT_FAULTS, "slow", "push_behind_reply", "late_tickets", "idle_close",
          "restart")  # fmt: skip


class AppError(Exception):
    """The application's own error inside a checkout block."""


class ShortRead(Exception):
    """The relay hung up before the whole reply came."""


class Mismatch(Exception):
    """A reply that is not the caller's own (a violation: the channel is discarded)."""


# -- sockets and descriptors ---------------------------------------------------------------


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""  # closed meanwhile (the directory listdir had open)


def _ports(fd: int) -> tuple[int, int | None, bool] | None:
    """A socket's local port, its peer's (None: not connected, or reset) and whether it
    listens; None if it is not an internet socket."""
    sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        local = sock.getsockname()[1]
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            remote = sock.getpeername()[1]
        except OSError:  # ENOTCONN: listening, connecting, or reset by the peer
            remote = None
        return local, remote, listening
    finally:
        sock.detach()


@dataclass
class Census:
    """This process's descriptors at one instant, sorted by what they are."""

    total: int
    other: int  # not sockets, or sockets that were there before the relays (trio's own)
    listeners: int
    clients: Counter[int]  # the pool's connections, by relay port
    servers: int  # the relays' side of connections
    orphans: int  # of those, the ones whose client side is closed (the relay hasn't noticed)
    unconnected_relay_side: int  # relay-side sockets reset by the peer, not closed yet
    unconnected_client_side: int  # the pool's sockets connecting, or reset and not closed yet

    @property
    def client_total(self) -> int:
        return sum(self.clients.values())


def census(
    relay_ports: Set[int], relay_fds: Set[int] = frozenset(), old_sockets: Set[str] = frozenset()
) -> Census:
    """A census of this process's descriptors.

    A socket connected to a relay port is the pool's, one connected from it a relay's. A
    socket without a peer (connecting, or reset and not closed yet) is a relay's if it is
    in ``relay_fds``, else the pool's. ``old_sockets`` (trio's own) count as other.
    """
    fds = os.listdir("/proc/self/fd")
    clients: Counter[int] = Counter()
    client_ports: set[int] = set()
    server_peers: list[int] = []
    listeners = other = unconnected_relay_side = unconnected_client_side = 0
    for name in fds:
        target = _target(name)
        ports = None
        if target.startswith("socket:[") and target not in old_sockets:
            ports = _ports(int(name))
        if ports is None:
            other += 1
            continue
        local, remote, listening = ports
        if listening:
            listeners += 1
        elif remote is None:
            if int(name) in relay_fds:
                unconnected_relay_side += 1
            else:
                unconnected_client_side += 1
        elif local in relay_ports:
            server_peers.append(remote)
        elif remote in relay_ports:
            clients[remote] += 1
            client_ports.add(local)
        else:
            other += 1
    orphans = sum(peer not in client_ports for peer in server_peers)
    return Census(
        len(fds), other, listeners, clients, len(server_peers), orphans,
        unconnected_relay_side, unconnected_client_side,
    )  # fmt: skip


def sockets_now() -> set[str]:
    """The sockets open now (trio's own, before the relays start)."""
    targets = (_target(name) for name in os.listdir("/proc/self/fd"))
    return {target for target in targets if target.startswith("socket:")}


def rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- what the pool holds, at every step ----------------------------------------------------


class BooksNeverOverflow(trio.abc.Instrument):
    """After every task step: each relay's books within ``max_connections``, and every
    idle channel only idle, open and unspent. Violations are recorded, not raised (trio
    would log an instrument's exception and remove the instrument)."""

    def __init__(self, pool: sc.SecureChannelPool) -> None:
        self.relays = list(pool._relays)
        self.peaks = [0] * len(self.relays)
        self.steps = 0
        self.violations: list[str] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        for index, relay in enumerate(self.relays):
            books = relay._books
            total = len(books.idle) + len(books.in_use) + books.opening
            if total > self.peaks[index]:
                self.peaks[index] = total
            if total > books.max_connections or books.opening < 0:
                self._violated(f"books of {relay!r}: total {total}, opening {books.opening}")
            for channel in books.idle:
                if channel in books.in_use or channel.closed or channel.spent is not None:
                    self._violated(f"idle {channel!r} on {relay!r}: also lent, closed or spent")

    def _violated(self, what: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(what)


# -- the soak ------------------------------------------------------------------------------


@dataclass
class Quiet:
    """The process at a quiet moment: workers parked, no fault on, closes finished."""

    memory: tracemalloc.Snapshot
    rss: int
    fds: Census


@dataclass
class Figures:
    """What the workers, the chaos and the sampler saw."""

    round_trips: int = 0
    checkouts: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    pushes_seen: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    max_clients: Counter[int] = field(default_factory=Counter)
    max_closing: int = 0
    max_fds: int = 0
    max_relay_leftovers: int = 0
    max_unconnected_client_side: int = 0
    # How long before a checkout began a push it saw first had reached its connection.
    oldest_fresh_push: float = -math.inf

    def violated(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(what)


class Soak:
    """Workers, chaos and a sampler over one pool and its relays."""

    def __init__(
        self,
        pool: sc.SecureChannelPool,
        relays: list[LoopbackRelay],
        relay_nursery: trio.Nursery,
        seed: int,
        baseline: Census,
        old_sockets: set[str],
    ) -> None:
        self.pool = pool
        self.relays = relays
        self.relay_nursery = relay_nursery
        self.seed = seed
        self.baseline = baseline  # before the pool opened
        self.old_sockets = old_sockets
        self.ports = {relay.port for relay in relays}
        self.figures = Figures()
        # When each push (by number) had been sent on every connection of its relay.
        self.push_sent_at = array("d")
        self.gate = trio.Event()  # workers go while it is set
        self.gate.set()
        self.parked = 0
        self.stopping = False

    # -- workers ---------------------------------------------------------------------------

    async def worker(self, number: int) -> None:
        rng = random.Random(f"{self.seed}/worker/{number}")
        filler = bytes(rng.choices(ALPHABET, k=1 << 16))
        sequence = 0
        while True:
            gate = self.gate
            if not gate.is_set():
                self.parked += 1
                await gate.wait()
                self.parked -= 1
            if self.stopping:
                return
            sequence += 1
            size = rng.choice(
                (rng.randint(1, 200), rng.randint(200, 4000), rng.randint(4000, 40000))
            )
            start = rng.randint(0, len(filler) - size)
            payload = b"[w%02d s%07d]" % (number, sequence) + filler[start : start + size]
            behaviour = rng.choices(
                ("plain", "hold", "cancel", "app_error"), weights=(70, 10, 10, 10)
            )[0]
            with trio.fail_after(CHECKOUT_BOUND):
                outcome = await self.checkout(rng, payload, behaviour)
            self.figures.outcomes[outcome] += 1
            await trio.sleep(rng.uniform(0, 0.005))

    async def checkout(self, rng: random.Random, payload: bytes, behaviour: str) -> str:
        """One checkout; returns how it ended."""
        self.figures.checkouts += 1
        began = trio.current_time()
        deadline = began + rng.uniform(0, 0.06) if behaviour == "cancel" else math.inf
        lent: sc.SecureChannel | None = None
        outcome = "ok"
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                async with self.pool.connection() as channel:
                    lent = channel
                    exact = rng.random() < 0.75
                    if behaviour == "app_error" and rng.random() < 0.3:
                        raise AppError  # before sending anything
                    if behaviour == "app_error" and rng.random() < 0.5:
                        await channel.send_all(payload)
                        raise AppError  # the reply is on its way
                    await self.round_trip(channel, payload, began=began, first=True, exact=exact)
                    if behaviour == "hold":
                        await trio.sleep(rng.uniform(0, 0.15))
                        again = payload.replace(b"]", b"+", 1)  # its own header too
                        await self.round_trip(channel, again, began=began, first=False, exact=exact)
                    if behaviour == "app_error":
                        raise AppError  # after a whole reply
            except AppError:
                outcome = "app_error"
            except ShortRead:
                outcome = "short_read"
            except Mismatch:
                outcome = "MISMATCH"  # (recorded as a violation)
            except trio.BrokenResourceError:
                outcome = "BrokenResourceError"
            except sc.SecureChannelError as exc:
                if not isinstance(exc, EXPECTED_ERRORS):
                    raise
                outcome = type(exc).__name__
        if scope.cancelled_caught:
            outcome = "cancelled"
        if lent is not None and outcome != "ok" and not lent.closed:
            self.figures.violated(f"{lent!r} not discarded after {outcome}")
        if lent is not None and lent.spent is not None and not lent.closed:
            self.figures.violated(f"{lent!r} spent ({lent.spent}) but not discarded")
        if lent is not None and not lent.closed:
            books = next(r._books for r in self.pool._relays if r.endpoint == lent.endpoint)
            if lent not in books.idle and lent not in books.in_use:
                self.figures.violated(f"{lent!r} given back, then neither pooled nor closed")
        return outcome

    async def round_trip(
        self, channel: sc.SecureChannel, payload: bytes, *, began: float, first: bool, exact: bool
    ) -> None:
        """Send ``payload``, read until as many bytes of reply came, and check that they
        are exactly ``payload``, give or take pushes (which may only have arrived while
        this checkout held the channel)."""
        await channel.send_all(payload)
        received = bytearray()
        data = received
        markers: list[tuple[int, bytes]] = []
        while True:
            inside_push = received.count(MARK) % 2
            want = len(payload) - len(data) if exact and not inside_push else None
            chunk = await channel.receive_some(want)
            if not chunk:
                raise ShortRead
            received += chunk
            if MARK not in received:
                data = received
            elif received.count(MARK) % 2 == 0:
                data, markers = split_pushes(received)
            else:
                continue  # in the middle of a push
            if len(data) >= len(payload):
                break
        if data != payload:
            at = next(
                (i for i, (a, b) in enumerate(zip(data, payload, strict=False)) if a != b),
                len(payload),
            )
            self.figures.violated(
                f"MISMATCH on {channel!r}: sent {len(payload)} bytes {payload[:16]!r}...,"
                f" got {len(data)} {bytes(data[:16])!r}..., first difference at {at}:"
                f" {bytes(data[at : at + 24])!r}"
            )
            raise Mismatch
        self.figures.round_trips += 1
        for position, tag in markers:
            where = "within" if position else "before"
            which = "first" if first else "second"
            self.figures.pushes_seen[f"{tag[:1].decode()} {where} {which} reply"] += 1
            if not first or position:
                continue
            # Before any byte of this checkout's first reply: a push that arrived while
            # the channel sat in the pool, unless it was sent after the checkout began.
            if tag.startswith(b"B"):
                self.figures.violated(
                    f"a push behind an earlier reply reached the next caller on {channel!r}"
                )
            else:
                number = int(tag[1:])
                age = began - self.push_sent_at[number]
                self.figures.oldest_fresh_push = max(self.figures.oldest_fresh_push, age)
                if age > PUSH_MARGIN:
                    self.figures.violated(
                        f"push {number}, sent {age:.3f}s before"
                        f" the checkout, reached its caller on {channel!r}"
                    )

    @asynccontextmanager
    async def workers_parked(self) -> AsyncIterator[None]:
        """Every worker waiting between two checkouts, until the block ends."""
        self.gate = trio.Event()
        try:
            await wait_until(lambda: self.parked == WORKERS, within=CHECKOUT_BOUND)
            yield
        finally:
            self.gate.set()

    async def quiet(self) -> Quiet:
        """Park the workers, let the closes finish, and take figures."""
        async with self.workers_parked():
            await wait_until(lambda: all(r._closer._pending == 0 for r in self.pool._relays))
            return Quiet(memory_snapshot(), rss_bytes(), self.sample())

    # -- chaos -----------------------------------------------------------------------------

    async def chaos(self, seconds: float) -> None:
        """Faults at random for ``seconds``; returns once every relay is healed."""
        rng = random.Random(f"{self.seed}/chaos")
        faulty: set[int] = set()
        deck: list[str] = []
        stop_at = trio.current_time() + seconds
        async with trio.open_nursery() as faults:
            while trio.current_time() < stop_at:
                await trio.sleep(rng.uniform(0.05, 0.3))
                if rng.random() < 0.3:
                    # A feed besides: pushes that find spares idle a while prove more.
                    faults.start_soon(self.instant_fault, "push", rng.randrange(RELAYS))
                if not deck:
                    deck = list(FAULTS)
                    rng.shuffle(deck)
                kind = deck.pop()
                if kind in INSTANT_FAULTS:
                    faults.start_soon(self.instant_fault, kind, rng.randrange(len(self.relays)))
                    continue
                free = [index for index in range(len(self.relays)) if index not in faulty]
                if len(faulty) >= MAX_FAULTY:
                    deck.append(kind)  # try again later
                    continue
                index = rng.choice(free)
                faulty.add(index)
                faults.start_soon(self.fault, kind, index, rng.uniform(0.1, 1.5), rng, faulty)

    async def instant_fault(self, kind: str, index: int) -> None:
        relay = self.relays[index]
        self.figures.faults[kind] += 1
        if kind == "reset":
            relay.kill_connections()
            await trio.lowlevel.checkpoint()
            return
        # LoopbackRelay.push, one connection at a time, to know when each got its push.
        reached = 0
        for stream in list(relay._streams):
            number = len(self.push_sent_at)
            self.push_sent_at.append(math.inf)  # not sent yet: seen anywhere, it is fine
            with trio.move_on_after(1.0):
                try:
                    await stream.push(b"\xffF%d\xff" % number)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    continue  # that connection died meanwhile
                self.push_sent_at[number] = trio.current_time()
                reached += 1
        self.figures.faults["push (connections reached)"] += reached

    async def fault(
        self, kind: str, index: int, duration: float, rng: random.Random, faulty: set[int]
    ) -> None:
        relay = self.relays[index]
        self.figures.faults[kind] += 1
        try:
            if kind in MODES:
                relay.fault = MODES[kind]
            elif kind == "slow":
                relay.latency = 0.25
            elif kind == "push_behind_reply":
                relay.push_behind_reply = b"\xffB%d\xff" % index
            elif kind == "late_tickets":
                relay.tickets_after = lambda: rng.uniform(0.005, 0.15)
            elif kind == "idle_close":
                relay.idle_close_after = rng.uniform(0.05, 0.5)
            elif kind == "restart":
                relay.stop()
            await trio.sleep(duration)
        finally:
            with trio.CancelScope(shield=True):
                await self.heal(relay)
            faulty.discard(index)

    async def heal(self, relay: LoopbackRelay) -> None:
        """Put a relay back to a healthy echo."""
        if relay.fault is Fault.STOP_READING:
            # Deaf connections sleep for ever and never notice their client left: reset
            # them, as restarting a wedged relay would (else the relay's side of every
            # connection the pool discarded stays open).
            relay.kill_connections()
        relay.fault = Fault.NONE
        relay.latency = 0.0
        relay.push_behind_reply = None
        relay.tickets_after = None
        relay.idle_close_after = math.inf

    # -- sampling --------------------------------------------------------------------------

    def sample(self) -> Census:
        """A census of the process's sockets, checked against the books in the same step."""
        relay_fds = {
            fd
            for relay in self.relays
            for wire in relay._wires
            if isinstance(wire.transport, trio.SocketStream)
            and (fd := wire.transport.socket.fileno()) >= 0
        }
        taken = census(self.ports, relay_fds, self.old_sockets)
        figures = self.figures
        figures.samples += 1
        allowed_total = closing = 0
        for relay in self.pool._relays:
            port = relay.endpoint.port
            pending = relay._closer._pending
            closing += pending
            allowed = relay._books.total + pending
            allowed_total += allowed
            sockets = taken.clients[port]
            figures.max_clients[port] = max(figures.max_clients[port], sockets)
            if sockets > allowed:
                figures.violated(
                    f"{sockets} connections to port {port}; the books count"
                    f" {relay._books.total}, and {pending} closing"
                )
        unconnected = taken.unconnected_client_side
        if taken.client_total + unconnected > allowed_total:
            figures.violated(f"{taken}: more of the pool's sockets than {allowed_total}")
        if taken.other != self.baseline.other:
            figures.violated(f"other descriptors: {taken}, before the pool {self.baseline}")
        # Both ends of each connection the books allow, the closes under way, and what
        # the relays have not closed yet of connections the pool left.
        leftovers = taken.orphans + taken.unconnected_relay_side
        bound = self.baseline.total + 2 * (RELAYS * MAX_CONNECTIONS + closing) + leftovers
        if taken.total > bound:
            figures.violated(f"{taken.total} descriptors, bound {bound}: {taken}")
        figures.max_closing = max(figures.max_closing, closing)
        figures.max_fds = max(figures.max_fds, taken.total)
        figures.max_relay_leftovers = max(figures.max_relay_leftovers, leftovers)
        figures.max_unconnected_client_side = max(
            figures.max_unconnected_client_side, taken.unconnected_client_side
        )
        return taken

    async def sampler(self) -> None:
        while not self.stopping:
            self.sample()
            await trio.sleep(0.1)


def split_pushes(received: bytearray) -> tuple[bytearray, list[tuple[int, bytes]]]:
    """The reply's bytes, and each push with how many reply bytes came before it."""
    parts = received.split(bytes([MARK]))
    data = bytearray()
    markers = []
    for index, part in enumerate(parts):
        if index % 2:
            markers.append((len(data), bytes(part)))
        else:
            data += part
    return data, markers


class LogCounter(logging.Handler):
    """Counts what the pool logs, keeping only the last few lines; a record with a
    traceback is a bug caught in the background (a spare that failed other than to
    connect, a close that raised)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.levels: Counter[str] = Counter()
        self.tracebacks: list[str] = []
        self.last: deque[str] = deque(maxlen=10)

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        self.last.append(f"{record.levelname} {record.getMessage()}")
        if record.exc_info and len(self.tracebacks) < 5:
            self.tracebacks.append(self.format(record))


@contextmanager
def counting_logs() -> Iterator[LogCounter]:
    """The pool's log records, counted here and not passed on: pytest keeps every record
    (and through it each logged error, its traceback and every frame in it) to show if
    the test fails, which would hide the pool's own memory use."""
    handler = LogCounter()
    logger = logging.getLogger("trio_securechannel")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield handler
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


@contextmanager
def tracing_memory() -> Iterator[None]:
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start(1)
    try:
        yield
    finally:
        if not already:
            tracemalloc.stop()


def memory_snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),  # the snapshots themselves
            # pytest keeps every log record of the test (the pool warns of each failed
            # spare, each breaker that opens) to show them if it fails.
            tracemalloc.Filter(False, logging.__file__),
            tracemalloc.Filter(False, "*/_pytest/*"),
        )
    )


async def echo_once(channel: sc.SecureChannel, payload: bytes) -> bytes:
    await channel.send_all(payload)
    reply = b""
    while len(reply) < len(payload):
        chunk = await channel.receive_some(len(payload) - len(reply))
        if not chunk:
            raise ShortRead
        reply += chunk
    return reply


async def drive_until_breakers_close(pool: sc.SecureChannelPool, figures: Figures) -> float:
    """Check channels out until every relay's breaker is closed; how long that took."""
    began = trio.current_time()
    with trio.fail_after(10):
        while any(e["breaker"]["state"] != "closed" for e in pool.status()["endpoints"]):
            try:
                async with pool.connection() as channel:
                    if await echo_once(channel, b"trial") != b"trial":
                        figures.violated("MISMATCH in recovery")
            except (*EXPECTED_ERRORS, trio.BrokenResourceError, ShortRead) as exc:
                figures.outcomes[f"recovery {type(exc).__name__}"] += 1
            await trio.sleep(0.01)
    return trio.current_time() - began


async def assert_every_slot_free(pool: sc.SecureChannelPool) -> None:
    """`helpers.assert_all_slots_free` for several relays: nothing held, and
    ``max_connections`` checkouts at once on every relay, each with its own reply."""
    connections = books(pool)
    assert (connections["in_use"], connections["opening"], connections["waiting"]) == (0, 0, 0)
    capacity = MAX_CONNECTIONS * len(pool.endpoints)
    held = trio.Semaphore(0)
    release = trio.Event()

    async def hold(number: int) -> None:
        async with pool.connection() as channel:
            payload = b"slot %d" % number
            assert await echo_once(channel, payload) == payload
            held.release()
            await release.wait()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for number in range(capacity):
                nursery.start_soon(hold, number)
            for _ in range(capacity):
                await held.acquire()
            in_use = [e["connections"]["in_use"] for e in pool.status()["endpoints"]]
            assert in_use == [MAX_CONNECTIONS] * len(pool.endpoints)
            release.set()
    assert books(pool)["in_use"] == 0


def check_books(pool: sc.SecureChannelPool, status: sc.PoolStatus) -> None:
    """Quiet now: nothing in use, opening or waiting, and every figure adds up."""
    connections = status["connections"]
    assert connections["in_use"] == connections["opening"] == connections["waiting"] == 0
    assert connections["opened_total"] - connections["closed_total"] == len(pool.channels())
    assert connections["closed_total"] == sum(connections["closed_by_reason"].values())
    endpoints = status["endpoints"]
    for endpoint, relay in zip(endpoints, pool._relays, strict=True):
        own = endpoint["connections"]
        assert own["opened_total"] - own["closed_total"] == len(relay.channels())
        assert own["idle"] == len(relay.channels())
        assert endpoint["errors_total"] == sum(endpoint["errors_by_kind"].values())
        assert endpoint["breaker"]["state"] == "closed"
    # Counted once, where it happened: the totals are the sums of each relay's.
    by_kind: Counter[str] = Counter()
    for endpoint in endpoints:
        by_kind.update(endpoint["errors_by_kind"])
    assert status["errors_by_kind"] == dict(by_kind)
    assert status["errors_total"] == sum(by_kind.values())
    assert status["errors_total"] == sum(e["errors_total"] for e in endpoints)
    for key in ("pool_exhausted_total", "bytes_sent_total", "bytes_received_total"):
        assert status[key] == sum(e[key] for e in endpoints), key
    breaker = status["breaker"]
    assert breaker["opened_total"] == sum(e["breaker"]["opened_total"] for e in endpoints)
    assert breaker["rejected_total"] == sum(e["breaker"]["rejected_total"] for e in endpoints)


def top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[str]:
    return [str(stat) for stat in after.compare_to(before, "lineno")[:6]]


async def test_soak(client_context: ssl.SSLContext, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1 << 32))

    def show(line: str) -> None:
        with capsys.disabled():  # in CI logs, passed or failed
            print(line, flush=True)

    show(f"\nsoak: {SECONDS:g}s of faults, SOAK_SEED={seed}")
    with tracing_memory(), counting_logs() as logs, trio.fail_after(SECONDS + 120):
        await soak(client_context, seed, logs, show)


async def soak(
    client_context: ssl.SSLContext, seed: int, logs: LogCounter, show: Callable[[str], None]
) -> None:
    gc.collect()  # garbage of earlier tests closes now, not while we count
    old_sockets = sockets_now()
    before_relays = census(set(), old_sockets=old_sockets)
    async with trio.open_nursery() as relay_nursery:
        relays: list[LoopbackRelay] = [new_relay() for _ in range(RELAYS)]
        for relay in relays:
            await relay_nursery.start(relay.serve)
        ports = {relay.port for relay in relays}
        before_pool = census(ports, old_sockets=old_sockets)
        options: dict[str, Any] = {"ssl_context": client_context, **OPTIONS}
        async with sc.open_pool([relay.target for relay in relays], **options) as pool:
            monitor = BooksNeverOverflow(pool)
            trio.lowlevel.add_instrument(monitor)
            try:
                soak = Soak(pool, relays, relay_nursery, seed, before_pool, old_sockets)
                figures = soak.figures
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(soak.sampler)
                    for number in range(WORKERS):
                        nursery.start_soon(soak.worker, number)
                    await trio.sleep(WARM_UP)
                    warm = await soak.quiet()
                    warm_round_trips = figures.round_trips
                    await soak.chaos(SECONDS)
                    end = await soak.quiet()
                    soak.stopping = True
                # The relays are healthy again: every breaker closes, spares settle.
                recovery = await drive_until_breakers_close(pool, figures)
                await wait_until(lambda: books(pool)["opening"] == 0)
                check_books(pool, pool.status())
                await assert_every_slot_free(pool)
                status = pool.status()
                check_books(pool, status)
            finally:
                trio.lowlevel.remove_instrument(monitor)
        after_pool = census(ports, old_sockets=old_sockets)
        for relay in relays:
            relay.stop()
        relay_nursery.cancel_scope.cancel()
    after_relays = census(set(), old_sockets=old_sockets)

    by_file = end.memory.compare_to(warm.memory, "filename")
    growth = sum(stat.size_diff for stat in by_file)
    library = os.path.dirname(sc.__file__)
    own_growth = sum(
        stat.size_diff for stat in by_file if stat.traceback[0].filename.startswith(library)
    )
    outcomes = figures.outcomes
    summary: dict[str, Any] = {
        "seed": seed,
        "seconds of faults": SECONDS,
        "round trips": f"{figures.round_trips} ({warm_round_trips} in the warm-up)",
        "checkouts": figures.checkouts,
        "outcomes": dict(outcomes.most_common()),
        "pushes seen": dict(figures.pushes_seen),
        "oldest push seen first (s before the checkout)": round(figures.oldest_fresh_push, 4),
        "faults": dict(sorted(figures.faults.items())),
        "opened": status["connections"]["opened_total"],
        "closed by reason": status["connections"]["closed_by_reason"],
        "errors by kind": status["errors_by_kind"],
        "breakers opened": status["breaker"]["opened_total"],
        "breakers closed again within (s)": round(recovery, 3),
        "books peaks": monitor.peaks,
        "instrument steps": monitor.steps,
        "socket samples": figures.samples,
        "max connections per relay": [figures.max_clients[relay.port] for relay in relays],
        "max closes under way": figures.max_closing,
        # (the relays' side: a deaf relay's connections linger until it is reset)
        "relays' max_active": [relay.max_active for relay in relays],
        "logs": dict(logs.levels),
        "fds": (
            f"before relays {before_relays.total}, before pool {before_pool.total},"
            f" after warm-up {warm.fds.total}, end of chaos {end.fds.total},"
            f" max {figures.max_fds}, after pool {after_pool.total},"
            f" after relays {after_relays.total}; max relay-side leftovers"
            f" {figures.max_relay_leftovers}, max pool sockets connecting or reset"
            f" {figures.max_unconnected_client_side}"
        ),
        "memory": (
            f"traced {growth / 1024:+.1f} KiB from warm-up to end of chaos,"
            f" {own_growth / 1024:+.1f} KiB of it in trio_securechannel;"
            f" RSS {warm.rss / 2**20:.1f} -> {end.rss / 2**20:.1f} MiB"
        ),
        "top growth": top_growth(warm.memory, end.memory),
    }
    show("soak summary:")
    for key, value in summary.items():
        show(f"  {key}: {value}")
    for violation in monitor.violations + figures.violations:
        show(f"  VIOLATION {violation}")
    if monitor.violations or figures.violations:
        show(f"  last log lines: {list(logs.last)}")

    tag = f"SOAK_SEED={seed}"
    assert monitor.violations == [], tag
    assert figures.violations == [], tag
    assert logs.tracebacks == [], (tag, logs.tracebacks)
    assert max(monitor.peaks) <= MAX_CONNECTIONS, tag
    # The faults all happened, and checkouts got their reply anyway.
    if SECONDS >= 10:
        assert set(figures.faults) >= set(FAULTS), tag
    # (About 150 a second here; 30 a second with both cores busy elsewhere.)
    assert figures.round_trips >= 15 * SECONDS, (tag, figures.round_trips)
    # (A checkout the breakers refuse costs nothing: callers retry in a loop.)
    assert outcomes["ok"] >= 0.3 * (figures.checkouts - outcomes["CircuitOpen"]), tag

    # Each error a caller saw was counted once, on its relay (a connect that failed
    # over to another relay is counted but never seen).
    def seen(name: str) -> int:
        return outcomes[name] + outcomes[f"recovery {name}"]

    errors = status["errors_by_kind"]
    assert errors.get("io", 0) == seen("BrokenResourceError"), tag
    assert errors.get("timeout", 0) >= seen("RequestTimeout"), tag  # (and connects')
    assert status["pool_exhausted_total"] == seen("PoolExhausted"), tag
    # Descriptors: the pool's sockets are gone as it closes, the relays' when they stop,
    # and the rest never changed.
    assert after_pool.client_total + after_pool.unconnected_client_side == 0, (tag, after_pool)
    assert after_relays.total == before_relays.total, (tag, before_relays, after_relays)
    assert before_relays.other == warm.fds.other == end.fds.other == after_relays.other, tag
    for quiet in (warm, end):
        # No more than the books allow, now that no close is under way; the relays hold
        # the other end of each, and those the pool closed that they have not noticed.
        fds = quiet.fds
        assert fds.client_total + fds.unconnected_client_side <= RELAYS * MAX_CONNECTIONS, tag
        leftovers = fds.orphans + fds.unconnected_relay_side
        assert fds.total <= before_pool.total + 2 * RELAYS * MAX_CONNECTIONS + leftovers, tag
    # Memory: flat between two quiet moments.
    assert growth < MEMORY_BOUND, (tag, summary["memory"], summary["top growth"])
    assert own_growth < OWN_MEMORY_BOUND, (tag, summary["memory"], summary["top growth"])
