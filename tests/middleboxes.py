"""Real third-party middleboxes on 127.0.0.1 for the tests: HAProxy, nginx and stunnel.

Each ``run_*`` context manager writes its program's configuration into a fresh directory
under ``tmp_path``, starts the program in the foreground on a free loopback port, waits
until the port listens, and yields a `Middlebox`. On exit it stops the program by its pid
(SIGTERM, then SIGKILL) and reaps it, shielded and bounded, however the block ends.

The programs are Debian's ``haproxy``, ``nginx`` with ``libnginx-mod-stream``, and
``stunnel4`` (``.ci/run`` installs them). Mark each test with ``@requires("haproxy")``
(or ``"nginx"``, ``"stunnel4"``): where the program is missing, it is skipped with a
reason naming it. Readiness is read from ``/proc/net/tcp`` rather than probed with a
connection, so no middlebox forwards a probe to the backend a test counts: Linux only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import final

import pytest
import trio
import trustme

from helpers import closed_port

#: How long a program may take to listen on its port before the test fails.
START_LIMIT = 10.0
#: How long a program may take to exit after SIGTERM before it gets SIGKILL.
STOP_GRACE = 5.0

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_NGINX_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules")
_TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


def missing(program: str) -> str | None:
    """Why ``program`` cannot run here, naming it; None when it can.

    ``program`` is ``"haproxy"``, ``"stunnel4"`` or ``"nginx"`` (which needs its stream
    module too).
    """
    if not Path("/proc/net/tcp").exists():
        return f"{program}: the middlebox harness reads /proc/net/tcp (Linux only)"
    if _which(program) is None:
        return f"{program} is not installed (Debian package {program})"
    if program == "nginx" and _nginx_stream_module() is None:
        return "nginx's stream module is not installed (Debian package libnginx-mod-stream)"
    return None


def requires(program: str) -> pytest.MarkDecorator:
    """A mark that skips the test, saying which program is missing, unless it can run.

    Mark every test that runs a middlebox: the ``run_*`` functions skip too when their
    program is missing, but a skip raised in a Trio test loses its reason on the way out.
    """
    reason = missing(program)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens right now (connects are refused)."""
    return closed_port()


@final
@dataclass(frozen=True)
class Middlebox:
    """A running middlebox: its loopback port, its process, and where it logs."""

    name: str
    port: int
    process: trio.Process
    directory: Path
    log_path: Path

    @property
    def target(self) -> tuple[str, int]:
        """What to pass to ``open_pool``: ``("127.0.0.1", port)``."""
        return ("127.0.0.1", self.port)

    def log(self) -> str:
        """Everything the program wrote to its log so far."""
        return _read_log(self.log_path)

    def queued(self) -> int:
        """Connections the kernel completed that the program has not accepted yet: the
        length of its listen socket's accept queue (HAProxy over ``maxconn`` parks them
        there)."""
        queues = [rx_queue for _, rx_queue in _listeners(self.port)]
        assert queues, f"{self.name}: nothing listens on 127.0.0.1:{self.port}"
        return sum(queues)


@asynccontextmanager
async def run_haproxy(
    backend: tuple[str, int],
    *,
    tmp_path: Path,
    maxconn: int | None = None,
    backlog: int | None = None,
) -> AsyncIterator[Middlebox]:
    """HAProxy in ``mode tcp`` in front of ``backend``: TLS passes through untouched.

    Args:
        backend: ``(host, port)`` of the server behind it (a TLS relay of the tests).
        tmp_path: Directory for its configuration and log (a fresh subdirectory).
        maxconn: The frontend's ``maxconn``; connections beyond it wait, unaccepted, in the
            listen socket's queue until one closes. None: HAProxy's default.
        backlog: The listen queue's length. None: HAProxy's default, which is ``maxconn``
            when set (so the kernel holds only about ``maxconn + 1`` waiting connections;
            connects beyond that see their SYN dropped and retried a second later).
    """
    binary = _program("haproxy")
    port = free_port()
    directory = _fresh_directory(tmp_path, "haproxy")
    limits = "".join(
        f"    {keyword} {value}\n"
        for keyword, value in (("maxconn", maxconn), ("backlog", backlog))
        if value is not None
    )
    config = _write(
        directory / "haproxy.cfg",
        f"""\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend relays
    bind 127.0.0.1:{port}
{limits}    default_backend relays

backend relays
    server relay {backend[0]}:{backend[1]}
""",
    )
    argv = [binary, "-db", "-f", str(config)]
    async with _running("haproxy", argv, port, directory) as middlebox:
        yield middlebox


@asynccontextmanager
async def run_stunnel(
    backend: tuple[str, int], *, tmp_path: Path, cert: trustme.LeafCert
) -> AsyncIterator[Middlebox]:
    """stunnel terminating TLS (TLS 1.2 and 1.3) in front of the plain TCP ``backend``.

    It handshakes first and connects to the backend after: with the backend down, the
    client's handshake completes and stunnel then drops the connection. Over TLS 1.3 it
    sends its session tickets right after the handshake, as OpenSSL servers do.

    Args:
        backend: ``(host, port)`` of a plain TCP server (an `EchoBackend`).
        tmp_path: Directory for its configuration, key and log (a fresh subdirectory).
        cert: The certificate chain and key it presents (the tests' ``SERVER_CERT``).
    """
    binary = _program("stunnel4")
    port = free_port()
    directory = _fresh_directory(tmp_path, "stunnel")
    pem = directory / "cert-and-key.pem"
    _write_secret(pem, cert.private_key_and_cert_chain_pem.bytes())
    config = _write(
        directory / "stunnel.conf",
        f"""\
foreground = yes
pid =
syslog = no
debug = info

[relay]
accept = 127.0.0.1:{port}
connect = {backend[0]}:{backend[1]}
cert = {pem}
sslVersionMin = TLSv1.2
""",
    )
    async with _running("stunnel4", [binary, str(config)], port, directory) as middlebox:
        yield middlebox


@asynccontextmanager
async def run_nginx_stream(
    backend: tuple[str, int], *, tmp_path: Path, cert: trustme.LeafCert
) -> AsyncIterator[Middlebox]:
    """nginx's stream module terminating TLS (1.2 and 1.3) in front of the TCP ``backend``.

    One process (``master_process off``), so it never switches user, even as root; its
    prefix, pid file and error log are all in its directory, never /var/log or /run. Like
    stunnel it connects to the backend only after the handshake.

    Args:
        backend: ``(host, port)`` of a plain TCP server (an `EchoBackend`).
        tmp_path: Directory for its configuration, key and log (a fresh subdirectory).
        cert: The certificate chain and key it presents (the tests' ``SERVER_CERT``).
    """
    binary = _program("nginx")
    module = _nginx_stream_module()
    assert module is not None
    port = free_port()
    directory = _fresh_directory(tmp_path, "nginx")
    chain = _write(
        directory / "cert.pem", "".join(pem.bytes().decode() for pem in cert.cert_chain_pems)
    )
    key = directory / "key.pem"
    _write_secret(key, cert.private_key_pem.bytes())
    log_path = directory / "error.log"
    config = _write(
        directory / "nginx.conf",
        f"""\
load_module {module};
daemon off;
master_process off;
pid {directory / "nginx.pid"};
error_log {log_path} info;

events {{
    worker_connections 256;
}}

stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        proxy_pass {backend[0]}:{backend[1]};
        proxy_connect_timeout 2s;
    }}
}}
""",
    )
    argv = [binary, "-p", f"{directory}/", "-c", str(config), "-e", str(log_path)]
    async with _running("nginx", argv, port, directory, log_path=log_path) as middlebox:
        yield middlebox


class EchoBackend:
    """A plain TCP echo server on 127.0.0.1, the backend behind the TLS terminators.

    Start it with ``await nursery.start(backend.serve)``; `stop` closes its listener (new
    connects are refused) and its connections (with a FIN, not a reset); ``serve`` again
    restarts it on the same port. ``accepts`` counts the connections it accepted.
    """

    def __init__(self) -> None:
        self.port = 0
        self.accepts = 0
        self.active = 0
        self.echoed_bytes = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def target(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                await trio.serve_listeners(self._handle, listeners, task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Close the listener and every connection; return once they are closed."""
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepts += 1
        self.active += 1
        try:
            async with stream:
                while data := await stream.receive_some():
                    await stream.send_all(data)
                    self.echoed_bytes += len(data)
        except trio.BrokenResourceError:
            pass  # the middlebox reset its side
        finally:
            self.active -= 1


# -- running a program -----------------------------------------------------------------------


@asynccontextmanager
async def _running(
    name: str, argv: list[str], port: int, directory: Path, *, log_path: Path | None = None
) -> AsyncIterator[Middlebox]:
    """Run ``argv`` in the foreground until the block ends; stdout and stderr go to
    ``<directory>/<name>.out`` (also the log, unless the program writes ``log_path``)."""
    output = directory / f"{name}.out"
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd=directory
        )
    finally:
        os.close(fd)
    middlebox = Middlebox(name, port, process, directory, log_path or output)
    try:
        await _wait_listening(middlebox, output)
        try:
            yield middlebox
        except BaseException:
            # Shown under "Captured stdout" when the test fails: what the program said.
            print(f"---- {name} log ({middlebox.log_path}) ----\n{_tail(middlebox.log_path)}")
            raise
    finally:
        await _stop(middlebox)


async def _wait_listening(middlebox: Middlebox, output: Path) -> None:
    process = middlebox.process
    with trio.move_on_after(START_LIMIT):
        while not _listens(middlebox.port, process.pid):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{middlebox.name} exited with status {process.returncode} before"
                    f" listening on 127.0.0.1:{middlebox.port}:\n{_tail(output)}"
                    + _also(middlebox.log_path, output)
                )
            await trio.sleep(0.01)
        return
    raise RuntimeError(
        f"{middlebox.name} (pid {process.pid}) did not listen on 127.0.0.1:{middlebox.port}"
        f" within {START_LIMIT} s:\n{_tail(output)}" + _also(middlebox.log_path, output)
    )


async def _stop(middlebox: Middlebox) -> None:
    """SIGTERM, up to `STOP_GRACE` seconds, then SIGKILL; reaped either way."""
    process = middlebox.process
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
    if process.returncode is None:
        raise RuntimeError(f"{middlebox.name} (pid {process.pid}) outlived SIGKILL")


# -- synchronous helpers: files and /proc ----------------------------------------------------


def _which(program: str) -> str | None:
    # Debian installs the daemons in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN]))


def _nginx_stream_module() -> str | None:
    for directory in _NGINX_MODULE_DIRS:
        path = Path(directory, "ngx_stream_module.so")
        if path.is_file():
            return str(path)
    return None


def _program(name: str) -> str:
    """The path of program ``name``, or skip the test (see `requires`)."""
    reason = missing(name)
    if reason is not None:
        pytest.skip(reason)
    path = _which(name)
    assert path is not None
    return path


def _fresh_directory(tmp_path: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(_read_log(path).splitlines()[-lines:])


def _also(log_path: Path, output: Path) -> str:
    return "" if log_path == output else f"\n{log_path}:\n{_tail(log_path)}"


def _listeners(port: int) -> list[tuple[str, int]]:
    """``(inode, accept queue length)`` of each socket listening on 127.0.0.1:``port``."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            ip = socket.inet_ntoa(struct.pack("=I", int(address, 16)))
            if fields[3] == _TCP_LISTEN and int(port_hex, 16) == port and ip == "127.0.0.1":
                found.append((fields[9], int(fields[4].split(":")[1], 16)))
    return found


def _listens(port: int, pid: int) -> bool:
    """Whether process ``pid`` holds a socket listening on 127.0.0.1:``port``."""
    sockets = {f"socket:[{inode}]" for inode, _ in _listeners(port)}
    if not sockets:
        return False
    fds = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fds)
    except FileNotFoundError:
        return False  # it exited
    for name in names:
        try:
            if os.readlink(fds / name) in sockets:
                return True
        except FileNotFoundError:
            continue  # closed meanwhile
    return False
