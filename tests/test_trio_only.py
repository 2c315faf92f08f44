"""A Trio library says so when asyncio runs it, instead of failing deep inside trio."""

from __future__ import annotations

import asyncio
import ssl

import pytest

import trio_securechannel as sc

TRIO_ONLY = (
    r"^trio_securechannel is a Trio library: open_pool\(\) must run under trio\.run\(\),"
    r" not under asyncio \(an asyncio program can run Trio code with trio-asyncio\)$"
)


@pytest.mark.parametrize("own_context", [False, True], ids=["system-roots", "own-context"])
def test_open_pool_under_asyncio_says_it_is_a_trio_library(
    client_context: ssl.SSLContext, own_context: bool
) -> None:
    # Without a context the pool would first load the system roots in a Trio thread;
    # with one it would first open its Trio nursery. Either way the user is told why.
    context = client_context if own_context else None
    entered = False

    async def main() -> None:
        nonlocal entered
        async with sc.open_pool("127.0.0.1:1", ssl_context=context):
            entered = True

    with pytest.raises(RuntimeError, match=TRIO_ONLY) as info:
        asyncio.run(main())
    assert not entered
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # not chained to trio's "must be called from..."
