"""A Trio library says so when asyncio runs it, instead of failing deep inside trio."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import sniffio

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
    assert info.value.__context__ is None  # nothing of trio's "must be called from ..."


async def test_open_pool_from_asyncio_code_inside_trio_says_so(
    client_context: ssl.SSLContext,
) -> None:
    # trio-asyncio runs asyncio code inside trio.run, marked (for sniffio) as asyncio's:
    # there trio's own current_task() works, and the pool used to crash the whole run
    # with a TrioInternalError.
    running, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
    try:
        with pytest.raises(RuntimeError, match=TRIO_ONLY):
            async with sc.open_pool("127.0.0.1:1", ssl_context=client_context):
                pass
    finally:
        sniffio.thread_local.name = running
