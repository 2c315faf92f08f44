"""Parsing and naming the relay a pool talks to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import final

#: What `open_pool` accepts as a target: ``"host:port"``, ``"[v6addr]:port"`` or ``(host, port)``.
Target = str | tuple[str, int]


@final
@dataclass(frozen=True)
class Endpoint:
    """A relay's host and port, validated.

    Attributes:
        host: A DNS name or an IP address (IPv6 without brackets). TLS checks the
            certificate against it, and sends it as SNI when it is a name.
        port: TCP port, 1-65535.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, target: object, *, field: str = "target") -> Endpoint:
        """Validate a target given as ``"host:port"``, ``"[v6]:port"`` or ``(host, port)``.

        Raises:
            TypeError: The target is neither a string nor a ``(host, port)`` tuple.
            ValueError: The host is empty or malformed, or the port is missing or out of range.
        """
        if isinstance(target, str):
            host, port = _split_host_port(target, field)
        elif isinstance(target, tuple) and len(target) == 2:
            host, port = target
            if not isinstance(host, str):
                raise TypeError(f"{field}: host must be a str, got {type(host).__name__}")
            if isinstance(port, bool) or not isinstance(port, int):
                raise TypeError(
                    f"{field}: port must be an int, got {type(port).__name__}"
                    " (several relays go in a list)"
                )
        else:
            raise TypeError(
                f"{field} must be 'host:port', '[v6addr]:port' or a (host, port) tuple,"
                f" got {target!r}"
            )
        return cls(_check_host(host, field, target), _check_port(port, field, target))


def _split_host_port(target: str, field: str) -> tuple[str, int]:
    if "://" in target:
        raise ValueError(f"{field}: expected 'host:port', not a URL: {target!r}")
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{field}: expected '[v6addr]:port', got {target!r}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{field}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep:
            raise ValueError(f"{field}: missing ':port' in {target!r}")
        if ":" in host:
            raise ValueError(f"{field}: write IPv6 addresses as '[addr]:port', got {target!r}")
    if not port_text.isdigit():
        raise ValueError(f"{field}: port must be a number, got {port_text!r} in {target!r}")
    return host, int(port_text)


def _check_host(host: str, field: str, target: object) -> str:
    if not host or host != host.strip() or any(c in host for c in "/@?#[] \t"):
        raise ValueError(f"{field}: invalid host {host!r} in {target!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:  # what DNS and SNI will need: empty or over-long labels fail here, not later
            host.encode("idna")
        except UnicodeError as exc:
            raise ValueError(f"{field}: invalid host name {host!r}: {exc}") from None
    return host


def _check_port(port: int, field: str, target: object) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"{field}: port {port} out of range 1-65535 in {target!r}")
    return port
