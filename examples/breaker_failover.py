"""React to a relay going down: follow ``breaker_events()`` and fail over to a backup.

Two pools, a primary relay and a backup. A watcher follows the primary's breaker: when it
opens, traffic moves to the backup; when it closes again (a trial succeeded), traffic comes
back. Self-contained: both relays run locally with a throwaway CA, and the primary goes
down for a while.

    python examples/breaker_failover.py
"""

from __future__ import annotations

import ssl

import trio
import trustme

import trio_securechannel as sc


class EchoRelay:
    """A local TLS echo relay that can be stopped and started again on the same port."""

    def __init__(self, server_context: ssl.SSLContext) -> None:
        self.server_context = server_context
        self.port = 0
        self._scope = trio.CancelScope()

    async def start(self, nursery: trio.Nursery) -> None:
        self.port = await nursery.start(self._serve)

    def stop(self) -> None:
        self._scope.cancel()  # closes the listener and every connection

    async def _serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            tcp_listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            task_status.started(tcp_listeners[0].socket.getsockname()[1])
            listeners = [trio.SSLListener(tcp, self.server_context) for tcp in tcp_listeners]
            await trio.serve_listeners(_echo, listeners)


async def _echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def main() -> list[str]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    config = sc.PoolConfig(
        ssl_context=client_context, breaker_failure_threshold=2, breaker_cooldown=0.5
    )
    log: list[str] = []

    async with trio.open_nursery() as relays:
        primary, backup = EchoRelay(server_context), EchoRelay(server_context)
        await primary.start(relays)
        await backup.start(relays)

        async with (
            # min_idle: the primary's pool tries a trial by itself once the cooldown ends,
            # so it finds out the relay is back without any traffic sent its way.
            sc.open_pool(("127.0.0.1", primary.port), config=config, min_idle=1) as main_pool,
            sc.open_pool(("127.0.0.1", backup.port), config=config) as backup_pool,
            trio.open_nursery() as nursery,
        ):
            active = main_pool

            async def follow_breaker() -> None:
                nonlocal active
                with main_pool.breaker_events() as events:
                    async for event in events:
                        log.append(f"primary breaker: {event.from_state.value} -> "
                                   f"{event.to_state.value} ({event.reason})")  # fmt: skip
                        if event.to_state is sc.BreakerState.OPEN:
                            active = backup_pool
                        elif event.to_state is sc.BreakerState.CLOSED:
                            active = main_pool

            nursery.start_soon(follow_breaker)
            served_by: list[str] = []
            for tick in range(12):  # a quarter of a second each
                if tick == 3:
                    primary.stop()  # the primary goes down...
                    log.append("primary relay: down")
                if tick == 7:
                    await primary.start(relays)  # ...and comes back on its port
                    log.append("primary relay: back")
                for _ in range(5):
                    pool = active
                    try:
                        async with pool.connection() as channel:
                            await channel.send_line(b"tx")
                            await channel.receive_line()  # one whole reply
                        served_by.append("primary" if pool is main_pool else "backup")
                    except (sc.SecureChannelError, trio.BrokenResourceError) as exc:
                        served_by.append(f"failed ({type(exc).__name__})")
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        relays.cancel_scope.cancel()
    log.append("served by: " + ", ".join(f"{name} x{len(list(group))}"
                                         for name, group in _runs(served_by)))  # fmt: skip
    for line in log:
        print(line)
    return log


def _runs(items: list[str]) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1][1].append(item)
        else:
            runs.append((item, [item]))
    return runs


if __name__ == "__main__":
    trio.run(main)
