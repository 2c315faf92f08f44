"""Parsing and naming the relay a pool talks to."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import final
from urllib.parse import urlsplit

#: What `open_pool` accepts as a target: ``"host:port"``, ``"[v6addr]:port"``,
#: ``"tls://host:port"``, ``"wss://host[:port]/path"`` or ``(host, port)``.
Target = str | tuple[str, int]

#: The port a ``wss://`` URL means when it names none.
WSS_DEFAULT_PORT = 443

# A host name as DNS, SNI and the Host header carry it (underscores are seen in the wild).
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


@final
@dataclass(frozen=True)
class Endpoint:
    """A relay's host and port, validated, and the WebSocket path for ``wss://`` relays.

    Attributes:
        host: A DNS name or an IP address (IPv6 without brackets). TLS checks the
            certificate against it, and sends it as SNI when it is a name.
        port: TCP port, 1-65535.
        websocket_path: For a ``wss://`` relay, the resource its WebSocket upgrade asks
            for (path and query, at least ``"/"``); None for a raw TLS stream relay.
    """

    host: str
    port: int
    websocket_path: str | None = None

    def __str__(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.websocket_path is None:
            return address
        return f"wss://{address}{self.websocket_path}"

    @property
    def is_websocket(self) -> bool:
        """True for a ``wss://`` relay: its channels carry WebSocket messages."""
        return self.websocket_path is not None

    @property
    def host_header(self) -> str:
        """What a WebSocket upgrade sends as ``Host``: the ASCII (IDNA) form of the name,
        and the port only when not the default."""
        if ":" in self.host:
            host = f"[{self.host}]"
        else:
            try:
                ipaddress.ip_address(self.host)
                host = self.host
            except ValueError:
                host = self.host.encode("idna").decode("ascii")
        return host if self.port == WSS_DEFAULT_PORT else f"{host}:{self.port}"

    @classmethod
    def parse(cls, target: object, *, field: str = "target") -> Endpoint:
        """Validate a target given as ``"host:port"``, ``"[v6]:port"``, ``"tls://host:port"``,
        ``"wss://host[:port][/path]"`` or ``(host, port)``.

        Raises:
            TypeError: The target is neither a string nor a ``(host, port)`` tuple.
            ValueError: The host is empty or malformed, the port is missing or out of
                range, or the URL is not ``tls://`` or ``wss://``.
        """
        scheme = target[:6].lower() if isinstance(target, str) else ""
        if isinstance(target, str) and scheme == "wss://":
            return _parse_wss(target, field)
        if isinstance(target, str) and scheme == "tls://":
            host, port = _split_host_port(target[6:], field, target)
        elif isinstance(target, str):
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


def _parse_wss(target: str, field: str) -> Endpoint:
    # urlsplit silently drops tabs and newlines: refuse them (and all whitespace) first.
    if any(c.isspace() or not c.isprintable() for c in target):
        raise ValueError(f"{field}: whitespace or a control character in {target!r}")
    try:
        url = urlsplit(target)
    except ValueError as exc:  # e.g. a bracketed host that is not an IPv6 address
        raise ValueError(f"{field}: malformed URL {target!r}: {exc}") from None
    if url.username is not None or url.password is not None:
        raise ValueError(f"{field}: credentials in a relay URL are not supported: {target!r}")
    if url.fragment or target.endswith("#"):
        raise ValueError(f"{field}: a WebSocket URL has no fragment: {target!r}")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"{field}: invalid port in {target!r}") from None
    host = url.hostname or ""
    if url.netloc.startswith("[") and not _is_ipv6(host):
        raise ValueError(f"{field}: {host!r} in brackets is not an IPv6 address")
    if ":" in host and not url.netloc.startswith("["):
        raise ValueError(f"{field}: write IPv6 addresses as '[addr]', got {target!r}")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if not path.isascii():  # it goes into the upgrade request as it is
        raise ValueError(f"{field}: non-ASCII path in {target!r}: percent-encode it")
    return Endpoint(
        _check_host(host, field, target),
        _check_port(WSS_DEFAULT_PORT if port is None else port, field, target),
        path,
    )


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _split_host_port(target: str, field: str, given: str | None = None) -> tuple[str, int]:
    given = target if given is None else given
    if "://" in target:
        scheme = target.partition("://")[0]
        hint = " (plain ws:// is not TLS: use wss://)" if scheme.lower() == "ws" else ""
        raise ValueError(
            f"{field}: unsupported scheme {scheme!r} in {given!r};"
            f" expected 'host:port', 'tls://host:port' or 'wss://host[:port]/path'{hint}"
        )
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
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{field}: port must be a number, got {port_text!r} in {target!r}")
    return host, int(port_text)


def _check_host(host: str, field: str, target: object) -> str:
    if not host or not host.isprintable() or any(c.isspace() or c in "/@?#[]%" for c in host):
        raise ValueError(f"{field}: invalid host {host!r} in {target!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:  # what DNS and SNI will need: empty or over-long labels fail here, not later
            ascii_name = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{field}: invalid host name {host!r}: {exc}") from None
        if not _HOST_NAME.match(ascii_name):  # (the idna codec lets ';', ',', '\\' through)
            raise ValueError(f"{field}: invalid host name {host!r}") from None
    return host


def _check_port(port: int, field: str, target: object) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"{field}: port {port} out of range 1-65535 in {target!r}")
    return port
