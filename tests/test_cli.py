"""The command line, run as a user runs it: a subprocess, its output and exit status."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

import trio_securechannel as sc

from conftest import SERVER_CERT, make_server_context
from jsonrpc_relay import JsonRpcRelay
from relay import Relay, closed_port

ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trio_securechannel", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=ENV,
        )


async def test_demo_runs_and_prints_the_summary() -> None:
    done = await cli("demo", "--duration", "3", "--workers", "4")
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "Summary" in out
    assert "round trips/s" in out
    assert "metrics: http://127.0.0.1:" in out
    assert 'curl -H "Authorization: Bearer ' in out
    round_trips = next(line for line in out.splitlines() if "│ round trips  " in line)
    assert int(round_trips.split("│")[2].strip().replace(",", "")) > 100
    assert done.stderr == b""


async def test_demo_over_websocket_runs_and_counts_the_flaky_relays_resets() -> None:
    done = await cli("demo", "--websocket", "--fault", "flaky", "--duration", "3")
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "relay:   wss://127.0.0.1:" in out
    round_trips = next(line for line in out.splitlines() if "│ round trips  " in line)
    assert int(round_trips.split("│")[2].strip().replace(",", "")) > 100
    errors = next(line for line in out.splitlines() if "errors by kind" in line)
    assert "io " in errors  # the relay's resets, each counted once


async def test_demo_with_the_relay_going_down_opens_the_breaker() -> None:
    done = await cli("demo", "--duration", "6", "--fault", "down")
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    opened = next(line for line in out.splitlines() if "breaker opened" in line)
    assert int(opened.split("│")[2]) >= 1  # down at 3 s, for 4 s


async def test_probe_prints_the_certificate_facts(relay: Relay, ca_file: Path) -> None:
    done = await cli(
        "probe", f"127.0.0.1:{relay.port}", "--cafile", str(ca_file), "--count", "3", "--send", "hi"
    )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    for fact in ("TLSv1.3", "TLS_", "trustme", "expires", "127.0.0.1, localhost, relay.test"):
        assert fact in out, fact
    assert "round trip ms (3)" in out
    report = json.loads(
        (
            await cli(
                "probe",
                f"127.0.0.1:{relay.port}",
                "--cafile",
                str(ca_file),
                "--json",
                "--send",
                "x",
            )
        ).stdout
    )
    assert report["tls_version"] == "TLSv1.3"
    assert report["round_trip_ms"]["count"] == 5
    assert report["subject_alt_names"] == ["127.0.0.1", "localhost", "relay.test"]


async def test_probe_speaks_electrum_by_default(nursery: trio.Nursery, ca_file: Path) -> None:
    # An Electrum server hangs up on a session that does not begin with server.version.
    electrum = JsonRpcRelay(make_server_context(), electrum_rules=True)
    await nursery.start(electrum.serve_tls)
    done = await cli("probe", electrum.target, "--cafile", str(ca_file), "--json")
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["server_version"] == ["jsonrpc-relay 1.0", "1.4"]
    assert report["round_trip_ms"]["count"] == 5
    assert electrum.calls["server.ping"] == 5
    assert electrum.hung_up == 0
    assert report["pin"] == sc.public_key_pin(SERVER_CERT.cert_chain_pems[0].bytes())


async def test_probe_counts_an_error_reply_as_a_failure_and_shows_it(
    nursery: trio.Nursery, ca_file: Path
) -> None:
    electrum = JsonRpcRelay(make_server_context(), electrum_rules=True)
    electrum.failing.add("server.ping")
    await nursery.start(electrum.serve_tls)
    done = await cli("probe", electrum.target, "--cafile", str(ca_file))
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"error: {electrum.target} answered server.ping with error -32001:"
        " server.ping failed, as the test asked"
    ]


async def test_probe_trusts_a_pinned_relay_and_refuses_a_wrong_pin(
    nursery: trio.Nursery, relay: Relay
) -> None:
    # No --cafile: the system roots do not know the test CA; the pin alone vouches.
    pin = sc.public_key_pin(SERVER_CERT.cert_chain_pems[0].bytes())
    target = f"127.0.0.1:{relay.port}"
    done = await cli("probe", target, "--pin", pin, "--send", "hi", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["pin"] == pin
    wrong = "sha256/" + "A" * 43 + "="
    done = await cli("probe", target, "--pin", wrong, "--send", "hi")
    assert done.returncode == 1
    assert f"its public key {pin} matches none of its pins" in done.stderr.decode()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (lambda relay: [f"127.0.0.1:{closed_port()}"], "Connection refused"),
        (lambda relay: [f"127.0.0.1:{relay.port}"], "certificate verify failed"),  # system roots
    ],
    ids=["refused", "untrusted"],
)
async def test_probe_failures_are_one_line(relay: Relay, args: object, words: str) -> None:
    done = await cli("probe", *args(relay))  # type: ignore[operator]
    assert done.returncode == 1
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines  # no traceback
    assert lines[0].startswith("error: ")
    assert words in lines[0]


async def test_probe_of_a_relay_that_does_not_speak_websocket_is_one_line(
    relay: Relay, ca_file: Path
) -> None:
    done = await cli("probe", f"wss://127.0.0.1:{relay.port}/ws", "--cafile", str(ca_file))
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "WebSocket upgrade failed" in lines[0]


async def test_probe_timeout_is_one_line(relay: Relay, ca_file: Path) -> None:
    relay.mode = "silent"
    done = await cli(
        "probe", f"127.0.0.1:{relay.port}", "--cafile", str(ca_file), "--timeout", "0.5"
    )
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"error: cannot open a secure channel to 127.0.0.1:{relay.port}:"
        " no TLS session within connect_timeout=0.5s"
    ]


BAD_ARGUMENTS = [
    [],
    ["frobnicate"],
    ["demo", "--duration", "-1"],
    ["demo", "--fault", "meteor"],
    ["probe"],
    ["probe", "x:1", "--count", "zero"],
]


@pytest.mark.parametrize("args", BAD_ARGUMENTS)
async def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    done = await cli(*args)
    assert done.returncode == 2
    assert b"usage: trio-securechannel" in done.stderr


async def test_every_subcommand_has_help_with_examples() -> None:
    for command in ("demo", "probe", "bench"):
        done = await cli(command, "--help")
        assert done.returncode == 0
        assert b"examples:" in done.stdout
        assert b"trio-securechannel " + command.encode() in done.stdout


async def test_the_library_imports_without_the_cli_extras() -> None:
    extras = ("rich", "trustme", "trio_securechannel._cli")
    code = f"import sys, trio_securechannel; print([m for m in {extras!r} if m in sys.modules])"
    done = await trio.run_process([sys.executable, "-c", code], capture_stdout=True)
    assert done.stdout.strip() == b"[]"


async def test_probe_a_websocket_relay(nursery: trio.Nursery, ca_file: Path) -> None:
    from trio_websocket import WebSocketRequest, serve_websocket

    from conftest import make_server_context

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.get_message()  # pings are answered by trio-websocket itself

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, make_server_context())
    port = server.port
    done = await cli("probe", f"wss://127.0.0.1:{port}/ws", "--cafile", str(ca_file), "--json")
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["websocket"] == "/ws"
    assert report["round_trip_ms"]["count"] == 5  # WebSocket pings answered with pongs
    assert report["tls_version"] == "TLSv1.3"
