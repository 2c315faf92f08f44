"""The command line, run as a user runs it: a subprocess, its output and exit status."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay

from conftest import SERVER_CERT, make_server_context
from helpers import closed_port
from jsonrpc_relay import JsonRpcRelay

ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
ROOT = Path(__file__).resolve().parent.parent


async def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trio_securechannel", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=ENV,
            cwd=cwd,
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


async def interrupt_the_demo(*gaps: float) -> tuple[int, str, str]:
    """Start the demo, wait until its traffic runs, press Ctrl-C (SIGINT), then once more
    after each of ``gaps`` seconds; return its exit status, standard output and error."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_securechannel", "demo", "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = bytearray(), bytearray()
    running = trio.Event()

    async def read(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        async with stream:
            async for chunk in stream:
                into += chunk
                # Its last line before the traffic starts: the relay, the pool and the
                # metrics server are up.
                if b"try:     curl" in stdout:
                    running.set()
        running.set()  # or it ended before that

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, process.stdout, stdout)
                nursery.start_soon(read, process.stderr, stderr)
                await running.wait()
                assert process.returncode is None, stderr.decode()
                await trio.sleep(0.5)  # round trips under way
                process.send_signal(signal.SIGINT)
                for gap in gaps:
                    await trio.sleep(gap)
                    process.send_signal(signal.SIGINT)
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    return status, stdout.decode(), stderr.decode()


async def test_demo_stopped_by_ctrl_c_prints_its_summary_and_exits_130() -> None:
    status, out, err = await interrupt_the_demo()
    assert status == 130, err
    assert "stopped early, after " in out
    assert "Summary" in out
    round_trips = next(line for line in out.splitlines() if "│ round trips  " in line)
    assert int(round_trips.split("│")[2].strip().replace(",", "")) > 0
    assert err == ""


@pytest.mark.parametrize("gap", [0.03, 0.06], ids=["30ms", "60ms"])
async def test_demo_stopped_by_ctrl_c_twice_exits_130_without_a_traceback(gap: float) -> None:
    # The second press finds the demo stopping its traffic, closing its pool, printing its
    # summary or already on its way out, as it comes: 130 all the same, at most one line.
    status, _, err = await interrupt_the_demo(gap)
    assert status == 130, err
    assert "Traceback" not in err
    assert err.splitlines() in ([], ["interrupted"])


async def test_probe_prints_the_certificate_facts(relay: LoopbackRelay, ca_file: Path) -> None:
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
    electrum = JsonRpcRelay(electrum_rules=True)
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
    electrum = JsonRpcRelay(electrum_rules=True)
    electrum.failing.add("server.ping")
    await nursery.start(electrum.serve_tls)
    done = await cli("probe", electrum.target, "--cafile", str(ca_file))
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"error: {electrum.target} answered server.ping with error -32001:"
        " server.ping failed, as the test asked"
    ]


async def test_probe_trusts_a_pinned_relay_and_refuses_a_wrong_pin(
    nursery: trio.Nursery, relay: LoopbackRelay
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
async def test_probe_failures_are_one_line(relay: LoopbackRelay, args: object, words: str) -> None:
    done = await cli("probe", *args(relay))  # type: ignore[operator]
    assert done.returncode == 1
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines  # no traceback
    assert lines[0].startswith("error: ")
    assert words in lines[0]


async def test_probe_of_a_relay_that_does_not_speak_websocket_is_one_line(
    relay: LoopbackRelay, ca_file: Path
) -> None:
    done = await cli("probe", f"wss://127.0.0.1:{relay.port}/ws", "--cafile", str(ca_file))
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "WebSocket upgrade failed" in lines[0]


async def test_probe_timeout_is_one_line(relay: LoopbackRelay, ca_file: Path) -> None:
    relay.fault = Fault.NO_TLS
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
    ["probe", "x:1", "--count", "10000001"],
]


@pytest.mark.parametrize("args", BAD_ARGUMENTS)
async def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    done = await cli(*args)
    assert done.returncode == 2
    assert b"usage: trio-securechannel" in done.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers", "10000000"], "argument --workers: must be from 1 to 1000: '10000000'"),
        (["--workers", "0"], "argument --workers: must be from 1 to 1000: '0'"),
        (["--duration", "1e9"], "argument --duration: must be from 0.1 to 86400: '1e9'"),
        (["--duration", "0.01"], "argument --duration: must be from 0.1 to 86400: '0.01'"),
    ],
    ids=["too-many-workers", "no-workers", "too-long", "too-short"],
)
async def test_demo_bounds_are_usage_errors_that_name_them(args: list[str], error: str) -> None:
    done = await cli("demo", *args)
    assert done.returncode == 2
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert lines[0].startswith("usage: trio-securechannel demo")
    assert lines[-1] == f"trio-securechannel demo: error: {error}"


async def test_bench_help_shows_the_suites_options() -> None:
    done = await cli("bench", "--help")
    assert done.returncode == 0
    for option in (b"--quick", b"--json PATH", b"--repeats N", b"--only NAMES"):
        assert option in done.stdout, option


needs_the_benchmarks = pytest.mark.skipif(
    not (ROOT / "benchmarks" / "__main__.py").is_file()
    or any(importlib.util.find_spec(name) is None for name in ("httpcore", "aiorpcx")),
    reason="the benchmarks need a source checkout and the bench extra",
)


@needs_the_benchmarks
async def test_bench_passes_its_options_on_to_the_suite() -> None:
    done = await cli("bench", "--quick", "--only", "4")  # the checkout case: seconds
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "| 4 | checkout + give-back" in out
    assert "quick run, 5 repeats" in out


@needs_the_benchmarks
async def test_bench_writes_json_where_it_was_asked_to(tmp_path: Path) -> None:
    # The suite runs in the checkout: a relative path is still the caller's.
    done = await cli("bench", "--json", "results.json", "--quick", "--only", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["settings"]["quick"] is True
    assert report["settings"]["only"] == ["checkout"]
    assert report["results"]


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


DIST = "trio-securechannel"  # the distribution, as pip knows it


@pytest.mark.parametrize("flag", ["--version", "-V"])
async def test_version_prints_the_running_version(flag: str) -> None:
    done = await cli(flag)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == f"trio-securechannel {sc.__version__}\n"
    assert done.stderr == b""


def test_the_installed_version_is_the_source_trees() -> None:
    # pyproject.toml reads it from __version__: a mismatch is a stale install (reinstall).
    assert importlib.metadata.version(DIST) == sc.__version__


async def test_version_needs_none_of_the_cli_extras() -> None:
    # As `pip install trio-securechannel` leaves it: no rich, no trustme.
    code = (
        "import sys; sys.modules.update(rich=None, trustme=None); "
        "sys.argv[1:] = ['--version']; "
        "from trio_securechannel._cli import run; run()"
    )
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == f"trio-securechannel {sc.__version__}\n"


def test_version_is_the_running_codes_not_a_stale_installs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_securechannel import _cli

    def stale(name: str) -> str:
        return "0.0.1"  # the metadata of an older install, beside a newer source tree

    monkeypatch.setattr(importlib.metadata, "version", stale)
    assert _cli.version() == sc.__version__
