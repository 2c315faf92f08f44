"""Logging that fits in an application: named loggers, levels that mean something, and not a
line on stderr unless the application asked for one (docs/logging.rst)."""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import trio_securechannel as sc
from trio_securechannel import BreakerState
from trio_securechannel.testing import Fault, LoopbackRelay

from helpers import echo, wait_until
from http_client import request

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs" / "logging.rst"
LOGGERS = {"trio_securechannel", "trio_securechannel.breaker", "trio_securechannel.metrics"}


def breaker_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """The breaker's records as (level, "from -> to")."""
    return [
        (record.levelno, record.getMessage().split(": ", 1)[1].split(" (")[0])
        for record in caplog.records
        if record.name == "trio_securechannel.breaker" and " -> " in record.getMessage()
    ]


def test_every_logger_is_a_documented_child_of_the_package() -> None:
    for module in pkgutil.iter_modules(sc.__path__, "trio_securechannel."):
        if module.name.rsplit(".", 1)[1] not in ("__main__", "_cli"):  # the command line's
            importlib.import_module(module.name)
    names = {
        name
        for name in logging.root.manager.loggerDict
        if name == "trio_securechannel" or name.startswith("trio_securechannel.")
    }
    assert names == LOGGERS
    documented = DOCS.read_text(encoding="utf-8")
    for name in names:
        assert f"``{name}``" in documented, name
    # Only the package's own logger has a handler: the NullHandler of the library recipe.
    [handler] = logging.getLogger("trio_securechannel").handlers
    assert type(handler) is logging.NullHandler


async def test_breaker_opens_at_warning_and_half_opens_and_closes_at_info(
    relay: LoopbackRelay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_securechannel")
    relay.fault = Fault.CLOSE_ON_ACCEPT
    options: dict[str, Any] = {"breaker_failure_threshold": 1, "breaker_cooldown": 0.2}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        with pytest.raises(sc.ConnectError):
            async with pool.connection():
                pass
        await wait_until(lambda: pool.breaker_state is BreakerState.HALF_OPEN)
        with pytest.raises(sc.ConnectError):  # the trial, still hung up on
            async with pool.connection():
                pass
        relay.fault = Fault.NONE
        await wait_until(lambda: pool.breaker_state is BreakerState.HALF_OPEN)
        async with pool.connection() as channel:  # the trial that brings it back
            assert await echo(channel, b"back") == b"back"
        assert pool.breaker_state is BreakerState.CLOSED
    assert breaker_lines(caplog) == [
        (logging.WARNING, "closed -> open"),
        (logging.INFO, "open -> half_open"),
        (logging.WARNING, "half_open -> open"),
        (logging.INFO, "open -> half_open"),
        (logging.INFO, "half_open -> closed"),
    ]
    [closing] = [r for r in caplog.records if "half_open -> closed" in r.getMessage()]
    assert closing.getMessage() == (
        f"circuit breaker for 127.0.0.1:{relay.port}: half_open -> closed (trial succeeded)"
    )


async def test_the_demo_shows_the_breaker_closing_as_well_as_opening() -> None:
    # The relay of ``--fault down`` is up 3 s, down 4 s: in the 10 s of the demo the breaker
    # opens, half-opens, opens again on a failed trial, half-opens and closes.
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_securechannel", "demo", "--fault", "down"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "COLUMNS": "160", "NO_COLOR": "1"},
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    assert "WARNING  circuit breaker for 127.0.0.1:" in out
    assert ": closed -> open (" in out
    assert ": open -> half_open (cooldown of 2s over)" in out
    assert ": half_open -> closed (trial succeeded)" in out


async def test_the_metrics_server_says_where_it_listens_and_hypercorn_says_nothing(
    relay: LoopbackRelay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, hypercorn's too
    options: dict[str, Any] = {"metrics_port": 0, "metrics_auth_token": "s3cret"}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        assert pool.metrics_address is not None
        host, port = pool.metrics_address
        for path in ("/metrics", "/status", "/nowhere"):
            response = await request(
                pool.metrics_address, path, headers=[("x-auth-token", "s3cret")]
            )
            assert response.status == (404 if path == "/nowhere" else 200)
    assert not [r for r in caplog.records if r.name.startswith("hypercorn")]
    assert "Running on" not in caplog.text
    assert "CTRL + C" not in caplog.text
    ours = [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "trio_securechannel.metrics"
    ]
    assert ours == [
        (logging.INFO, f"metrics server listening on http://{host}:{port}"),
        (logging.DEBUG, "metrics server stopped"),
    ]
    assert "s3cret" not in caplog.text


async def test_retire_reasons_of_the_users_own_make_one_label_and_go_to_the_log(
    relay: LoopbackRelay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_securechannel")
    options: dict[str, Any] = {"max_connections": 10, "metrics_port": 0}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:

        async def retire(first: int) -> None:
            for number in range(first, first + 100):
                async with pool.connection() as channel:
                    assert await echo(channel, b"x") == b"x"
                    channel.retire_when_returned(f"order #{number} settled")

        async with trio.open_nursery() as nursery:
            for first in range(0, 1000, 100):
                nursery.start_soon(retire, first)
        async with pool.connection() as channel:  # one of the pool's own reasons: kept
            assert await echo(channel, b"x") == b"x"
            channel.retire_when_returned("subscribed")
        assert pool.metrics_address is not None
        scraped = await request(pool.metrics_address, "/metrics")
        closed_by_reason = pool.status()["connections"]["closed_by_reason"]
    assert scraped.status == 200
    [family] = [
        family
        for family in text_string_to_metric_families(scraped.body.decode())
        if family.name == "securechannel_connections_closed"
    ]
    counted = {
        sample.labels["reason"]: sample.value
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {"user": 1000, "subscribed": 1}
    assert closed_by_reason == {"user": 1000, "subscribed": 1}
    assert b"order #" not in scraped.body
    logged = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.DEBUG
        and "to be retired when returned: " in record.getMessage()
    ]
    assert len(logged) == 1000
    assert {message.rsplit(": ", 1)[1] for message in logged} == {
        f"order #{number} settled" for number in range(1000)
    }


# -- no line on stderr, unless asked ----------------------------------------------------------

APPLICATION = textwrap.dedent(
    """
    import logging
    import ssl
    import sys
    from functools import partial
    from pathlib import Path

    import trio
    import trustme

    import trio_securechannel as sc

    if "--basic-config" in sys.argv:
        logging.basicConfig()  # the control: an application that asks for warnings

    CA = trustme.CA()
    SERVER_CONTEXT = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert("127.0.0.1").configure_cert(SERVER_CONTEXT)
    hang_up = False  # the relay's switch: accept, then close before any TLS

    async def relay(stream: trio.SocketStream) -> None:
        if hang_up:
            await stream.aclose()
            return
        tls = trio.SSLStream(stream, SERVER_CONTEXT, server_side=True)
        try:
            async with tls:
                while data := await tls.receive_some():
                    await tls.send_all(data)
        except trio.BrokenResourceError:
            pass

    async def get(address: tuple[str, int], path: str) -> bytes:
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode())
            reply = await stream.receive_some()
            return reply.split(b"\\r\\n", 1)[0]

    async def main(bundle: Path) -> None:
        global hang_up
        # A CA bundle with one corrupt block: a warning; the good certificate is loaded.
        bundle.write_bytes(
            b"-----BEGIN CERTIFICATE-----\\nbm90IGEgY2VydA==\\n-----END CERTIFICATE-----\\n"
            + CA.cert_pem.bytes()
        )
        context = sc.load_root_store(bundle)
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
            target = listener.socket.getsockname()[:2]
            async with sc.open_pool(
                target,
                ssl_context=context,
                breaker_failure_threshold=1,
                breaker_cooldown=0.1,
                metrics_port=0,
            ) as pool:
                async with pool.connection() as channel:
                    await channel.send_all(b"ping")
                    assert await channel.receive_some() == b"ping"
                    channel.retire_when_returned("a reason of my own")
                hang_up = True
                try:
                    async with pool.connection():
                        pass
                except sc.ConnectError:
                    pass
                assert pool.breaker_state is sc.BreakerState.OPEN  # a WARNING
                hang_up = False
                with trio.fail_after(5):
                    while pool.breaker_state is not sc.BreakerState.HALF_OPEN:
                        await trio.sleep(0.01)
                async with pool.connection() as channel:
                    await channel.send_all(b"back")
                    assert await channel.receive_some() == b"back"
                assert pool.breaker_state is sc.BreakerState.CLOSED  # an INFO
                assert pool.metrics_address is not None
                assert await get(pool.metrics_address, "/metrics") == b"HTTP/1.1 200 "
                assert await get(pool.metrics_address, "/nowhere") == b"HTTP/1.1 404 "
            nursery.cancel_scope.cancel()
        print("done")

    trio.run(main, Path(sys.argv[1]))
    """
)


async def test_an_application_that_configured_no_logging_hears_nothing(tmp_path: Path) -> None:
    script = tmp_path / "application.py"
    script.write_text(APPLICATION)

    async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(60):
            return await trio.run_process(
                [sys.executable, str(script), str(tmp_path / "bundle.pem"), *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

    quiet = await run()
    assert quiet.returncode == 0, quiet.stderr.decode()
    assert quiet.stdout == b"done\n"  # no access log either
    assert quiet.stderr == b""
    # The control: the same run, with logging.basicConfig(), has the library's warnings.
    asked = await run("--basic-config")
    assert asked.returncode == 0, asked.stderr.decode()
    assert asked.stdout == b"done\n"
    lines = asked.stderr.decode().splitlines()
    assert any(
        line.startswith("WARNING:trio_securechannel:Skipping certificate block 0") for line in lines
    ), lines
    assert any(
        line.startswith("WARNING:trio_securechannel.breaker:circuit breaker for 127.0.0.1:")
        and ": closed -> open (" in line
        for line in lines
    ), lines
    # Warnings only, as asked: no INFO (the breaker closing, the metrics server), no DEBUG.
    assert all(line.startswith("WARNING:") for line in lines), lines
    assert "a reason of my own" not in asked.stderr.decode()
    assert "Running on" not in asked.stderr.decode()
