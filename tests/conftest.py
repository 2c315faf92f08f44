"""Shared fixtures: one throwaway CA, real relays on 127.0.0.1 (the public testing kit's
`LoopbackRelay`), and contexts that trust it."""

from __future__ import annotations

import gc
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from trio_securechannel import load_root_store
from trio_securechannel.testing import LoopbackRelay, open_relay

pytest_plugins = ["trio_securechannel.testing.pytest_plugin"]

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("127.0.0.1", "localhost", "relay.test")


def make_server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    SERVER_CERT.configure_cert(context)
    return context


def new_relay(**options: Any) -> LoopbackRelay:
    """A relay (not yet serving) with the tests' CA and certificate, which `client_context`
    trusts: ``await nursery.start(relay.serve)``."""
    return LoopbackRelay(ca=CA, tls_context=make_server_context(), **options)


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Run the collector after every test, so a leaked socket (a ResourceWarning, an error
    here) is blamed on the test that leaked it rather than on whichever test runs next."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    CA.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def client_context(ca_file: Path) -> ssl.SSLContext:
    """What a user builds: our root store loader, pointed at the test CA's bundle."""
    return load_root_store(ca_file)


@pytest.fixture
async def relay() -> AsyncIterator[LoopbackRelay]:
    """A TLS echo relay on 127.0.0.1 with a random port, stopped after the test."""
    async with open_relay(ca=CA, tls_context=make_server_context()) as relay:
        yield relay


@pytest.fixture
async def memory_relay() -> AsyncIterator[LoopbackRelay]:
    """A TLS echo relay over in-memory streams (``open_transport=relay.open_memory_stream``),
    for tests on the mock clock."""
    async with open_relay(ca=CA, tls_context=make_server_context(), listen=False) as relay:
        yield relay
