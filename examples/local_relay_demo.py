"""Push traffic through a pool to a local TLS echo relay, then show what the pool saw.

Self-contained: a throwaway trustme CA signs the relay's certificate on 127.0.0.1, so
nothing leaves this machine. Halfway through, the relay drops every connection at once
(as a crashing relay would) and the pool recovers on its own.

    python examples/local_relay_demo.py [--workers 32] [--round-trips 200]
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import struct
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
import trustme

import trio_securechannel as sc


class EchoRelay:
    """A TLS echo relay that can crash on demand: every connection reset at once."""

    def __init__(self) -> None:
        self.transports: set[trio.SocketStream] = set()

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        transport = stream.transport_stream
        self.transports.add(transport)
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away without a TLS goodbye, or we crashed
        finally:
            self.transports.discard(transport)

    def crash(self) -> None:
        for transport in list(self.transports):
            # SO_LINGER 0: close() sends a TCP RST, as a dying relay's kernel would.
            transport.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.socket.close()


async def main(workers: int, round_trips: int) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "demo-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        client_context = sc.load_root_store(bundle)  # as you would with a real CA bundle

    relay = EchoRelay()
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_ssl_over_tcp, relay.handle, 0, server_context, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        print(f"TLS echo relay on 127.0.0.1:{port} (throwaway CA)")

        config = sc.PoolConfig(
            ssl_context=client_context, max_connections=8, min_idle=2, acquire_timeout=10.0
        )
        async with sc.open_pool(("127.0.0.1", port), config=config) as pool:
            latencies: list[float] = []
            failures: list[str] = []
            halfway = trio.Event()

            async def worker(n: int) -> None:
                for i in range(round_trips):
                    payload = f"tx {n}:{i} ".encode() * 4
                    started = time.perf_counter()
                    try:
                        async with pool.connection() as channel:
                            await channel.send_all(payload)
                            reply = b""
                            while len(reply) < len(payload):
                                chunk = await channel.receive_some()
                                if not chunk:
                                    raise trio.BrokenResourceError("relay closed")
                                reply += chunk
                        assert reply == payload
                        latencies.append(time.perf_counter() - started)
                        if len(latencies) >= workers * round_trips // 2:
                            halfway.set()
                    except (trio.BrokenResourceError, sc.SecureChannelError) as exc:
                        failures.append(type(exc).__name__)  # a real client would retry

            async def crash_relay_halfway() -> None:
                await halfway.wait()
                print(f"relay: crashing: resetting {len(relay.transports)} connections")
                relay.crash()

            began = time.perf_counter()
            async with trio.open_nursery() as traffic:
                traffic.start_soon(crash_relay_halfway)
                for n in range(workers):
                    traffic.start_soon(worker, n)
            elapsed = time.perf_counter() - began
            status = pool.status()

        nursery.cancel_scope.cancel()

    latencies.sort()
    done = len(latencies)
    print(f"\n{done} round trips by {workers} workers in {elapsed:.2f}s = {done / elapsed:,.0f}/s")
    if done:
        p50, p99 = latencies[done // 2], latencies[min(done - 1, done * 99 // 100)]
        print(f"latency p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    print(f"failed round trips (seen by callers, during the crash): {len(failures)}")
    print("pool status at the end:")
    print(json.dumps(status, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--round-trips", type=int, default=200)
    args = parser.parse_args()
    trio.run(main, args.workers, args.round_trips)
