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
# The longest name DNS carries (RFC 1035: 255 octets on the wire), without the root's dot.
_MAX_HOST_NAME = 253


@final
@dataclass(frozen=True, repr=False)
class Endpoint:
    """A relay's host and port, validated, and the WebSocket path for ``wss://`` relays.

    Its ``str()`` names the relay everywhere: in `status()`, metric labels, logs and
    errors. A ``wss://`` URL's query may hold a credential (``?apikey=...``), so there it is
    shown as ``?...``, in ``repr()`` too; the upgrade request still asks for the real one.

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
        return f"wss://{address}{_redacted_resource(self.websocket_path)}"

    def __repr__(self) -> str:
        path = self.websocket_path
        shown = None if path is None else _redacted_resource(path)
        return f"Endpoint(host={self.host!r}, port={self.port!r}, websocket_path={shown!r})"

    @property
    def is_websocket(self) -> bool:
        """True for a ``wss://`` relay, whose channels carry WebSocket messages."""
        return self.websocket_path is not None

    @property
    def host_header(self) -> str:
        """What a WebSocket upgrade sends as its ``Host`` header.

        The ASCII (IDNA) form of the name (an IPv6 address in brackets), and the port only
        when it is not 443.
        """
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
                f" got {_shown(target)}"
            )
        return cls(_check_host(host, field, target), _check_port(port, field, target))


def _parse_wss(target: str, field: str) -> Endpoint:
    # urlsplit silently drops tabs and newlines: refuse them (and all whitespace) first.
    if any(c.isspace() or not c.isprintable() for c in target):
        raise ValueError(f"{field}: whitespace or a control character in {_shown(target)}")
    try:
        url = urlsplit(target)
    except ValueError as exc:  # e.g. a bracketed host that is not an IPv6 address
        raise ValueError(f"{field}: malformed URL {_shown(target)}: {exc}") from None
    if url.username is not None or url.password is not None:
        raise ValueError(f"{field}: credentials in a relay URL are not supported: {_shown(target)}")
    if url.fragment or target.endswith("#"):
        raise ValueError(f"{field}: a WebSocket URL has no fragment: {_shown(target)}")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"{field}: invalid port in {_shown(target)}") from None
    host = url.hostname or ""
    if url.netloc.startswith("[") and not _is_ipv6(host):
        raise ValueError(f"{field}: {host!r} in brackets is not an IPv6 address")
    if ":" in host and not url.netloc.startswith("["):
        raise ValueError(f"{field}: write IPv6 addresses as '[addr]', got {_shown(target)}")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if not path.isascii():  # it goes into the upgrade request as it is
        raise ValueError(f"{field}: non-ASCII path in {_shown(target)}: percent-encode it")
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
            f"{field}: unsupported scheme {scheme!r} in {_shown(given)};"
            f" expected 'host:port', 'tls://host:port' or 'wss://host[:port]/path'{hint}"
        )
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{field}: expected '[v6addr]:port', got {_shown(given)}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{field}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep:
            raise ValueError(f"{field}: missing ':port' in {_shown(given)}")
        if ":" in host:
            raise ValueError(f"{field}: write IPv6 addresses as '[addr]:port', got {_shown(given)}")
    if not (port_text.isascii() and port_text.isdigit()):
        # (in a URL, what follows the host may be a query: not echoed on its own)
        got = "" if "://" in given else f", got {port_text!r}"
        raise ValueError(f"{field}: port must be a number{got} in {_shown(given)}")
    return host, int(port_text)


def check_host(host: str, *, field: str) -> str:
    """Check a host name or IP address (IPv6 without brackets) as DNS, TLS and sockets
    will need it: labels of 1-63 characters, at most 253 in all (its ASCII form).

    Returns:
        ``host`` unchanged.

    Raises:
        ValueError: It is none of these, naming ``field``.
    """
    try:
        ipaddress.ip_address(host)  # (a scoped IPv6 address, "fe80::1%lo", too)
        return host
    except ValueError:
        return _check_host(host, field, None)


def _check_host(host: str, field: str, target: object) -> str:
    within = "" if target is None else f" in {_shown(target)}"
    if not host or not host.isprintable() or any(c.isspace() or c in "/@?#[]%" for c in host):
        raise ValueError(f"{field}: invalid host {host!r}{within}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:  # what DNS and SNI will need: empty or over-long labels fail here, not later
            ascii_name = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{field}: invalid host name {host!r}: {exc}") from None
        if not _HOST_NAME.match(ascii_name):  # (the idna codec lets ';', ',', '\\' through)
            raise ValueError(f"{field}: invalid host name {host!r}") from None
        length = len(ascii_name.removesuffix("."))  # (the root's dot is not counted)
        if length > _MAX_HOST_NAME:
            raise ValueError(
                f"{field}: host name {host[:40]!r}... is {length} characters long;"
                f" DNS allows at most {_MAX_HOST_NAME}"
            ) from None
    return host


def _check_port(port: int, field: str, target: object) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"{field}: port {port} out of range 1-65535 in {_shown(target)}")
    return port


def _redacted_resource(resource: str) -> str:
    """A WebSocket resource (path and query) as shown: the query may hold a credential."""
    path, mark, _ = resource.partition("?")
    return f"{path}?..." if mark else path


def _shown(target: object) -> str:
    """``repr(target)`` for an error message. In a URL, the user's credentials and what
    follows the path (a query with an API key, a fragment) are left out."""
    if not (isinstance(target, str) and "://" in target):
        return repr(target)
    scheme, _, rest = target.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in netloc:
        netloc = "...@" + netloc.rpartition("@")[2]
    marks = [i for i in (tail.find(c) for c in "?#") if i >= 0]
    if marks:
        tail = f"{tail[: min(marks) + 1]}..."
    return repr(f"{scheme}://{netloc}{tail}")
