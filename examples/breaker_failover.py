"""React to a relay going down: follow ``breaker_events()`` and fail over to a backup.

Two pools, a primary relay and a backup. A watcher follows the primary's breaker: when it
opens, traffic moves to the backup; when it closes again (a trial succeeded), traffic comes
back. Self-contained: both relays are echo relays from the testing kit
(`trio_securechannel.testing.open_relay`) on 127.0.0.1, sharing a throwaway CA, and the
primary goes down for a while (``relay.stop()``: connects refused, every connection reset)
and comes back on its port (``relay.restart()``).

    python examples/breaker_failover.py

The kit needs ``pip install 'trio-securechannel[testing]'`` (trustme).
"""

from __future__ import annotations

import trio

import trio_securechannel as sc
from trio_securechannel.testing import open_relay


async def main() -> list[str]:
    log: list[str] = []

    # Two echo relays from the testing kit, sharing a throwaway CA: one client context
    # trusts both.
    async with open_relay() as primary, open_relay(ca=primary.ca) as backup:
        config = sc.PoolConfig(
            ssl_context=primary.client_context(),
            breaker_failure_threshold=2,
            breaker_cooldown=0.5,
        )
        async with (
            # min_idle: the primary's pool tries a trial by itself once the cooldown ends,
            # so it finds out the relay is back without any traffic sent its way.
            sc.open_pool(primary.address, config=config, min_idle=1) as main_pool,
            sc.open_pool(backup.address, config=config) as backup_pool,
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
                    # The primary goes down: connects refused, every connection reset...
                    primary.stop()
                    log.append("primary relay: down")
                if tick == 7:
                    primary.restart()  # ...and comes back on its port
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
