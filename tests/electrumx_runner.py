"""A real ElectrumX server on 127.0.0.1 for the tests, on Bitcoin regtest over a stub bitcoind.

`run_electrumx` starts a `StubBitcoind` (``electrumx_daemon``) with a short chain, writes a
certificate for 127.0.0.1 from a trustme CA, and runs ElectrumX as a subprocess with an SSL
service (newline-delimited JSON-RPC over TLS) and a WSS service on free loopback ports. It
yields once ElectrumX has indexed the whole chain and serves it; on exit it stops ElectrumX
by its pid (SIGTERM, then SIGKILL), shielded and bounded, then the stub daemon.

ElectrumX (PyPI's ``e-x``, with ``plyvel`` for its LevelDB) lives in a virtualenv of its own,
so its dependencies (aiorpcx, aiohttp, ...) never meet ours: ``.ci/run`` installs it into
``/opt/electrumx-venv``. `find_electrumx` says where it is; mark each test that runs it with
`requires_electrumx`, which skips it, saying why, where it is missing.

What ElectrumX is like as a server, for the tests written against it:

- ``server.version`` must be a session's first request, and only once; any other first
  request is answered with an error and the connection closed (after two unasked
  notifications, ``blockchain.relayfee`` and ``blockchain.estimatefee``, sent to crash
  old Electrum clients). Later requests may be pipelined behind it.
- It opens its client ports only after it has caught up with the daemon, so a listening
  port means a served chain.
- Over raw TLS it pads its messages with spaces (inside the JSON, before the final ``}``)
  to packets of at least 1 KiB and, once a session has been sent about 1 KiB, holds small
  messages back for up to a second to batch them: a notification can lag by that much.
- It answers requests of at most ``MAX_RECV`` bytes (1,000,000 by default) and responses
  of at most ``MAX_SEND`` (8,100,000 for Bitcoin).
- Its WSS service takes any path; each websocket text message is one JSON-RPC message
  (or batch), with neither padding nor newline.
- It learns of new blocks by polling the daemon: every 100 ms here (5 s by default).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

import pytest
import trio
import trustme

from electrumx_daemon import Block, StubBitcoind
from helpers import closed_port

#: How long ElectrumX may take to serve the stub chain after it starts.
START_LIMIT = 30.0
#: Starts with fresh ports when one chosen was taken before ElectrumX could bind it.
PORT_ATTEMPTS = 3
#: How long ElectrumX may take to exit after SIGTERM (it flushes its DB) before SIGKILL.
STOP_GRACE = 10.0
#: How long `ElectrumX.wait_synced` waits by default for ElectrumX to serve the daemon's tip.
SYNC_LIMIT = 10.0
#: Where ``.ci/run`` installs ElectrumX.
DEFAULT_ELECTRUMX_SERVER = "/opt/electrumx-venv/bin/electrumx_server"

_LOOPBACK = "127.0.0.1"

# Run in the child before it becomes ElectrumX: ask the kernel for SIGTERM when its parent
# (the test run) dies, however it dies, so no ElectrumX outlives the tests.
_EXEC_WITH_PARENT_DEATH_SIGNAL = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit("the test run exited before ElectrumX started")
os.execv(sys.argv[2], sys.argv[2:])
"""


def find_electrumx() -> str | None:
    """The ``electrumx_server`` script to run: ``$ELECTRUMX_SERVER`` if set, else the one in
    ``/opt/electrumx-venv``, else one on PATH; None if there is none."""
    explicit = os.environ.get("ELECTRUMX_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access(DEFAULT_ELECTRUMX_SERVER, os.X_OK):
        return DEFAULT_ELECTRUMX_SERVER
    return shutil.which("electrumx_server")


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the ElectrumX harness runs on Linux only (it reads /proc/net/tcp)"
    if find_electrumx() is None:
        return "ElectrumX not installed: .ci/run installs it into /opt/electrumx-venv"
    return None


#: Mark every test that runs ElectrumX: skipped, saying why, where it cannot run. (A skip
#: raised inside a Trio test loses its reason on the way out, so check before it starts.)
requires_electrumx = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@final
@dataclass(frozen=True)
class ElectrumX:
    """A running ElectrumX and the stub bitcoind it indexes."""

    ssl_port: int
    wss_port: int
    ca: trustme.CA
    daemon: StubBitcoind
    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path

    @property
    def ssl_target(self) -> str:
        """``"127.0.0.1:PORT"`` of the raw TLS service (newline-delimited JSON-RPC)."""
        return f"{_LOOPBACK}:{self.ssl_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://{_LOOPBACK}:{self.wss_port}/"

    @property
    def height(self) -> int:
        """The daemon's height: ElectrumX's too once it has caught up (`wait_synced`)."""
        return self.daemon.chain.height

    @property
    def tip(self) -> Block:
        return self.daemon.chain.tip

    def mine(self, count: int = 1) -> list[Block]:
        """Add ``count`` blocks to the daemon's chain; ElectrumX sees them within ~0.2 s and
        then notifies its ``blockchain.headers.subscribe`` subscribers."""
        return self.daemon.chain.mine(count)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts `ca`, and so ElectrumX's certificate."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    async def wait_synced(self, limit: float = SYNC_LIMIT) -> None:
        """Return once ElectrumX serves the daemon's tip (its header, at its height); raise
        RuntimeError, with its log, if it does not within ``limit`` seconds."""
        with trio.move_on_after(limit):
            while True:
                tip = self.tip
                served = await _served_tip(self.ssl_port, self.client_context())
                if served == {"height": tip.height, "hex": tip.header.hex()}:
                    return
                await trio.sleep(0.05)
        raise RuntimeError(
            f"ElectrumX did not serve height {self.height} within {limit} s:\n{self.log_tail()}"
        )

    def log(self) -> str:
        """Everything ElectrumX logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@asynccontextmanager
async def run_electrumx(
    tmp_path: Path,
    *,
    blocks: int = 10,
    ca: trustme.CA | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ElectrumX]:
    """ElectrumX on 127.0.0.1 over a stub bitcoind with ``blocks`` blocks above genesis.

    Args:
        tmp_path: Directory for its database, certificate and log (a fresh subdirectory).
        blocks: The chain's height when ElectrumX starts.
        ca: The CA that issues its certificate (for 127.0.0.1); None: a new one.
        env: ElectrumX settings (environment variables) to add or override, e.g.
            ``{"MAX_RECV": "5000"}``.
    """
    server = find_electrumx()
    if server is None:
        pytest.skip(_missing() or "")
    ca = ca or trustme.CA()
    directory = Path(tempfile.mkdtemp(prefix="electrumx-", dir=tmp_path))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    cert = ca.issue_cert(_LOOPBACK)
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    (directory / "db").mkdir()
    log_path = directory / "electrumx.out"
    with StubBitcoind(blocks) as daemon:
        settings = {
            "COIN": "Bitcoin",
            "NET": "regtest",
            "DB_ENGINE": "leveldb",
            "DB_DIRECTORY": str(directory / "db"),
            "DAEMON_URL": daemon.url,
            "SSL_CERTFILE": str(certfile),
            "SSL_KEYFILE": str(keyfile),
            "ALLOW_ROOT": "1",  # CI runs as root; ElectrumX refuses to without this
            "PEER_DISCOVERY": "off",  # no peers, no blacklist download: loopback only
            "PEER_ANNOUNCE": "",
            # See new blocks within ~0.2 s rather than 5 s (block poll, then mempool poll,
            # which must both see a height before ElectrumX notifies it).
            "DAEMON_POLL_INTERVAL_BLOCKS": "100",
            "DAEMON_POLL_INTERVAL_MEMPOOL": "100",
            # Never throttle the tests' many sessions, all from one address (0 = no limit).
            "COST_SOFT_LIMIT": "0",
            "COST_HARD_LIMIT": "0",
            "CACHE_MB": "64",
            "LOG_FORMAT": "%(asctime)s %(levelname)s:%(name)s:%(message)s",
            **(env or {}),
        }
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # Free when chosen, but anything may take a port before ElectrumX binds it.
            ssl_port, wss_port = _free_ports(2)
            settings["SERVICES"] = f"ssl://{_LOOPBACK}:{ssl_port},wss://{_LOOPBACK}:{wss_port}"
            process = await _start(server, settings, directory, log_path)
            electrumx = ElectrumX(ssl_port, wss_port, ca, daemon, process, directory, log_path)
            try:
                await _wait_listening(electrumx)
                break
            except BaseException as exc:
                await _stop(process)
                if not isinstance(exc, PortTaken) or attempt == PORT_ATTEMPTS:
                    raise
        try:
            await electrumx.wait_synced()
            try:
                yield electrumx
            except BaseException:
                # Shown under "Captured stdout" when the test fails: what ElectrumX said.
                print(f"---- ElectrumX log ({log_path}) ----\n{electrumx.log_tail()}")
                raise
            if process.poll() is not None:
                raise RuntimeError(
                    f"ElectrumX exited during the test (status {process.returncode}):\n"
                    + electrumx.log_tail()
                )
        finally:
            await _stop(process)


async def _start(
    server: str, settings: Mapping[str, str], directory: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    # Only what ElectrumX needs: nothing of our virtualenv (PYTHONPATH, VIRTUAL_ENV), and no
    # stray variable it reads (HOST, say, which it rejects as obsolete).
    environment = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(directory),
        "LANG": "C.UTF-8",
        **settings,
    }
    argv = [server]
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), server]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # Started from this (the main) thread, not trio's worker threads as open_process
        # would: the kernel's parent-death signal fires when the *thread* that forked the
        # child exits, and an idle worker thread exits after 10 s.
        process = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec: no wait
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd=directory,
            env=environment,
        )
    finally:
        os.close(fd)
    await trio.lowlevel.checkpoint()
    return process


class PortTaken(RuntimeError):
    """ElectrumX could not bind a port chosen for it: something took it meanwhile."""


async def _wait_listening(electrumx: ElectrumX) -> None:
    """Wait until ElectrumX says it listens on both ports (it opens them once it has caught
    up); `PortTaken` if it could not bind one."""
    process = electrumx.process
    ports = (electrumx.ssl_port, electrumx.wss_port)
    with trio.move_on_after(START_LIMIT):
        while True:
            log = electrumx.log()
            if any(f"failed to listen on {_LOOPBACK}:{port}" in log for port in ports):
                raise PortTaken(electrumx.log_tail())
            if all(f"server listening on {_LOOPBACK}:{port}" in log for port in ports):
                return
            if process.poll() is not None:
                raise RuntimeError(
                    f"ElectrumX exited with status {process.returncode} before listening:\n"
                    + electrumx.log_tail()
                )
            await trio.sleep(0.05)
    raise RuntimeError(
        f"ElectrumX (pid {process.pid}) did not serve on {electrumx.ssl_target} and"
        f" {electrumx.wss_url} within {START_LIMIT} s:\n{electrumx.log_tail()}"
    )


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, up to `STOP_GRACE` seconds, then SIGKILL; reaped either way."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await _exited(process)
        if process.poll() is None:
            process.kill()
            with trio.move_on_after(STOP_GRACE):
                await _exited(process)


async def _exited(process: subprocess.Popen[bytes]) -> None:
    while process.poll() is None:  # noqa: ASYNC110 - nothing to wait on but the child
        await trio.sleep(0.02)
    if process.returncode is None:
        raise RuntimeError(f"ElectrumX (pid {process.pid}) outlived SIGKILL")


async def _served_tip(port: int, context: ssl.SSLContext) -> dict[str, Any] | None:
    """What ElectrumX answers to ``blockchain.headers.subscribe`` on a new session; None if
    it refuses the connection or closes it."""
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "server.version", "params": ["harness", "1.4"]},
        {"jsonrpc": "2.0", "id": 2, "method": "blockchain.headers.subscribe", "params": []},
    ]
    try:
        stream = await trio.open_ssl_over_tcp_stream(_LOOPBACK, port, ssl_context=context)
    except OSError:
        return None
    async with stream:
        try:
            # Pipelined: ElectrumX holds the second request until the version is agreed.
            await stream.send_all(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
            buffer = b""
            while True:
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if message.get("id") == 2:
                        result: dict[str, Any] = message["result"]
                        return result
                data = await stream.receive_some()
                if not data:
                    return None
                buffer += data
        except trio.BrokenResourceError as error:
            if isinstance(error.__cause__, ssl.SSLCertVerificationError):
                raise  # no use retrying: the test's CA is not the one ElectrumX uses
            return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports on 127.0.0.1 where nothing listens right now."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(closed_port())
    return sorted(ports)
