"""TLS contexts from a throwaway CA (trustme): the relay's, and a client's that trusts it."""

from __future__ import annotations

import ssl

import trustme

#: The host in a relay's address when it serves in memory only: ``.invalid`` never
#: resolves (RFC 6761), so a pool given no ``open_transport`` fails at once.
MEMORY_HOST = "memory.invalid"

#: The names the relay's certificate is valid for.
RELAY_IDENTITIES = ("127.0.0.1", "localhost", "::1", MEMORY_HOST)


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*RELAY_IDENTITIES).configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """Verifies as a real client does (chain and name), trusting only ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.configure_trust(context)
    return context
