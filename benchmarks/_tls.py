"""The benchmark's own certificate authority (trustme) and the TLS contexts built on it.

Verification is never disabled: clients trust the throwaway CA, as the tests do.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from trio_securechannel import load_root_store

#: The name the server's certificate is issued for, and the host every client connects to.
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """PEM files of one run: the CA clients trust, and the server's chain with its key."""

    ca_file: Path
    server_file: Path


def make_certificates(directory: Path) -> Certificates:
    """Create a fresh CA and a server certificate for `HOST`, as PEM files in ``directory``."""
    ca = trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    certificates = Certificates(directory / "ca.pem", directory / "server.pem")
    ca.cert_pem.write_to_path(str(certificates.ca_file))
    server.private_key_and_cert_chain_pem.write_to_path(str(certificates.server_file))
    return certificates


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client context trusting the benchmark CA: the one users build, for pool and baseline.

    Each caller gets its own: httpcore sets ALPN on the context it is given.
    """
    return load_root_store(ca_file)


def server_context(server_file: Path) -> ssl.SSLContext:
    """The server's context, from the chain and key in ``server_file``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(server_file))
    return context
