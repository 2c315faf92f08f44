"""Shared fixtures: one throwaway CA, real relays on 127.0.0.1, and contexts that trust it."""

from __future__ import annotations

import gc
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trustme

from trio_securechannel import load_root_store

from relay import MemoryRelay, Relay

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("127.0.0.1", "localhost", "relay.test")


def make_server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    SERVER_CERT.configure_cert(context)
    return context


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
async def relay(nursery: trio.Nursery) -> AsyncIterator[Relay]:
    """A TLS echo relay on 127.0.0.1 with a random port, stopped after the test."""
    relay = Relay(make_server_context())
    await nursery.start(relay.serve)
    yield relay
    relay.stop()


@pytest.fixture
def memory_relay(nursery: trio.Nursery) -> MemoryRelay:
    """A TLS echo relay over in-memory streams, for tests on the mock clock."""
    return MemoryRelay(make_server_context(), nursery)
