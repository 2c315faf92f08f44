"""pytest fixtures for tests that use trio_securechannel (with pytest-trio).

Enable them in a ``conftest.py``::

    pytest_plugins = ["trio_securechannel.testing.pytest_plugin"]

``tls_relay`` is a raw-TLS echo `~trio_securechannel.testing.LoopbackRelay`, ``wss_relay``
a ``wss://`` one; each is stopped after the test. Give a pool ``relay.address`` and
``ssl_context=relay.client_context()``. They are async fixtures: the tests that use them
must be Trio tests (``trio_mode = true``, or ``@pytest.mark.trio``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._open import open_relay
from ._relay import LoopbackRelay


@pytest.fixture
async def tls_relay() -> AsyncIterator[LoopbackRelay]:
    """A TLS echo relay on 127.0.0.1 with a throwaway CA."""
    async with open_relay() as relay:
        yield relay


@pytest.fixture
async def wss_relay() -> AsyncIterator[LoopbackRelay]:
    """A ``wss://`` echo relay (one message back for each) on 127.0.0.1."""
    async with open_relay(websocket=True, path="/ws") as relay:
        yield relay
