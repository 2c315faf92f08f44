"""``trio-securechannel probe``: check a real relay's TLS and latency from a shell."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

import trio_securechannel as sc
from trio_securechannel.jsonrpc import JsonRpcChannel

#: The Electrum protocol versions the probe offers in ``server.version``.
ELECTRUM = ["1.4", "1.4.2"]


def probe(args: argparse.Namespace) -> int:
    try:
        report = trio.run(_probe, args)
    except sc.ConnectError as exc:
        return _fail(args, exc.phase, str(exc))
    except sc.SecureChannelError as exc:
        return _fail(args, "protocol", str(exc))
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        reason = (
            "no reply within --timeout"
            if isinstance(exc, trio.TooSlowError)
            else "the relay closed the connection"
        )
        return _fail(args, "round trip", f"{args.target}: {reason}")
    except ValueError as exc:  # a malformed target or URL
        return _fail(args, "usage", str(exc))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


async def _probe(args: argparse.Namespace) -> dict[str, Any]:
    endpoint = sc.Endpoint.parse(args.target)  # ValueError: a usage error
    # Reading the system's roots is file I/O: off the event loop.
    context = await trio.to_thread.run_sync(sc.load_root_store, args.cafile)
    electrum = args.send is None and not endpoint.is_websocket
    greeting: list[Any] = []
    options: dict[str, Any] = {
        "ssl_context": context,
        "max_connections": 1,
        "connect_timeout": args.timeout,
        "breaker_failure_threshold": 1000,  # a probe reports failures, it does not back off
    }
    if args.pin:
        options["pins"] = {args.target: args.pin}
    if electrum:  # Electrum servers hang up on a session that does not begin with this
        options["setup"] = _say_hello(greeting)
    async with sc.open_pool(args.target, **options) as pool:
        began = trio.current_time()
        lease = pool.websocket() if endpoint.is_websocket else pool.connection()
        async with lease as channel:
            connect_ms = (trio.current_time() - began) * 1000
            report = _tls_facts(channel, connect_ms)
            with trio.fail_after(args.timeout):
                if isinstance(channel, sc.WebSocketChannel):
                    samples = await _websocket_pings(channel, args.count)
                elif electrum:
                    samples = await _electrum_pings(channel, args.count)
                else:
                    samples = await _round_trips(channel, args.send.encode(), args.count)
            report["round_trip_ms"] = _percentiles(samples)
            if endpoint.websocket_path is not None:
                report["websocket"] = endpoint.websocket_path
            if greeting:
                report["server_version"] = greeting[0]
    return report


def _say_hello(greeting: list[Any]) -> Any:
    async def server_version(channel: sc.Channel) -> None:
        rpc = JsonRpcChannel(channel)
        greeting.append(await rpc.call("server.version", "trio-securechannel probe", ELECTRUM))

    return server_version


async def _electrum_pings(channel: sc.SecureChannel, count: int) -> list[float]:
    """``server.ping`` calls; an error reply fails the probe (`RpcError`), with its message."""
    rpc = JsonRpcChannel(channel)
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await rpc.call("server.ping")
        samples.append((time.perf_counter() - began) * 1000)
    return samples


async def _round_trips(channel: sc.SecureChannel, line: bytes, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await channel.send_line(line)
        await channel.receive_line()  # one whole line, however long
        samples.append((time.perf_counter() - began) * 1000)
    return samples


async def _websocket_pings(channel: sc.WebSocketChannel, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await channel.ping()  # returns when the pong comes back
        samples.append((time.perf_counter() - began) * 1000)
    return samples


def _tls_facts(channel: sc.Channel, connect_ms: float) -> dict[str, Any]:
    stream = channel.ssl_stream
    cert = stream.getpeercert() or {}  # (empty for a pinned relay: nothing was verified)
    der = stream.getpeercert(binary_form=True)
    cipher = stream.cipher()
    return {
        "target": str(channel.endpoint),
        "tls_version": stream.version(),
        "cipher": cipher[0] if cipher else None,
        "subject": _name(cert.get("subject", ())),
        "issuer": _name(cert.get("issuer", ())),
        "not_after": cert.get("notAfter"),
        "subject_alt_names": [value for _, value in cert.get("subjectAltName", ())],
        "pin": sc.public_key_pin(der) if der else None,  # for pins=, or --pin
        "connect_and_handshake_ms": round(connect_ms, 3),
        "handshake_ms": round(channel.handshake_seconds * 1000, 3),
    }


def _name(rdns: Any) -> str:
    return ", ".join(f"{key}={value}" for rdn in rdns for key, value in rdn)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"count": len(ordered), "min": round(ordered[0], 3), "p50": pick(0.5),
            "p90": pick(0.9), "p99": pick(0.99), "max": round(ordered[-1], 3),
            "mean": round(statistics.fmean(ordered), 3)}  # fmt: skip


def _print(report: dict[str, Any]) -> None:
    table = Table(title=f"probe {report['target']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, label in [("tls_version", "TLS"), ("cipher", "cipher"), ("subject", "subject"),
                       ("issuer", "issuer"), ("not_after", "expires"), ("pin", "key pin"),
                       ("connect_and_handshake_ms", "connect + handshake ms"),
                       ("handshake_ms", "TLS handshake ms")]:  # fmt: skip
        table.add_row(label, str(report[key]))
    table.add_row("names", ", ".join(report["subject_alt_names"]))
    if "server_version" in report:
        table.add_row("server.version", " ".join(map(str, report["server_version"])))
    rtt = report["round_trip_ms"]
    spread = f"p50 {rtt['p50']}  p90 {rtt['p90']}  p99 {rtt['p99']}  max {rtt['max']}"
    table.add_row(f"round trip ms ({rtt['count']})", spread)
    Console().print(table)


def _fail(args: argparse.Namespace, phase: str, message: str) -> int:
    if args.json:
        print(json.dumps({"target": args.target, "ok": False, "phase": phase, "error": message}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return 1
