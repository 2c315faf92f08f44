"""Certificate pinning: trusting a relay by its public key instead of a CA.

Many Electrum servers use self-signed certificates, which no CA vouches for; their
clients pin them instead. A pin is the SHA-256 of the certificate's SubjectPublicKeyInfo
(the public key and its algorithm), written ``sha256/<base64>`` as HPKP wrote it. It
survives a certificate's renewal with the same key, and TLS itself proves the relay holds
the matching private key (its handshake signature), so a matching pin is as strong a check
as a CA's, for that one relay.

A pinned relay's handshake checks no chain and no host name (a self-signed certificate
has neither to offer); the pin is checked right after it, before a byte is sent.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Mapping, Sequence

from ._endpoint import Endpoint
from ._errors import ConnectError

#: How a pin is written: this prefix, then the base64 of a SHA-256 digest.
PIN_PREFIX = "sha256/"

_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*-----END CERTIFICATE-----")


def public_key_pin(certificate: bytes | str) -> str:
    """The pin of a certificate (DER bytes, or PEM text): ``"sha256/<base64>"``.

    The same as ``openssl x509 -pubkey -noout | openssl pkey -pubin -outform der |
    openssl dgst -sha256 -binary | base64``.

    Raises:
        ValueError: Not a certificate.
    """
    if isinstance(certificate, bytes | bytearray) and b"-----BEGIN" in certificate:
        certificate = bytes(certificate).decode("ascii", "replace")  # PEM read as bytes
    if isinstance(certificate, str):
        block = _PEM_BLOCK.search(certificate)  # the first one: a chain starts with its leaf
        if block is None:
            raise ValueError("not a PEM certificate (no BEGIN CERTIFICATE block)")
        der = ssl.PEM_cert_to_DER_cert(block.group(0))
    elif isinstance(certificate, bytes | bytearray):
        der = bytes(certificate)
    else:
        raise TypeError(f"a certificate is DER bytes or PEM text, got {type(certificate).__name__}")
    return PIN_PREFIX + base64.b64encode(_digest(der)).decode("ascii")


def _digest(der: bytes) -> bytes:
    return hashlib.sha256(_subject_public_key_info(der)).digest()


def _subject_public_key_info(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate, as it is encoded there (RFC 5280:
    the seventh element of the TBSCertificate, or the sixth when there is no version)."""
    try:
        _, start, end = _element(der, 0, 0x30)  # Certificate
        _, start, end = _element(der, start, 0x30)  # TBSCertificate
        offset = start
        if der[offset] == 0xA0:  # [0] version, optional
            offset = _element(der, offset, 0xA0)[2]
        for tag in (0x02, 0x30, 0x30, 0x30, 0x30):  # serial, algorithm, issuer, validity,
            offset = _element(der, offset, tag)[2]  # subject
        header, _, spki_end = _element(der, offset, 0x30)
        if spki_end > end:
            raise ValueError("truncated")
        return der[header:spki_end]
    except IndexError:
        raise ValueError("not a DER certificate (truncated)") from None
    except ValueError as exc:
        raise ValueError(f"not a DER certificate ({exc})") from None


def _element(der: bytes, offset: int, tag: int) -> tuple[int, int, int]:
    """The DER element at ``offset``, which must carry ``tag``: (its start, the start of
    its content, its end)."""
    if der[offset] != tag:
        raise ValueError(f"expected tag {tag:#x} at byte {offset}, found {der[offset]:#x}")
    length, content = der[offset + 1], offset + 2
    if length & 0x80:  # long form: the length's own length, then the length
        size = length & 0x7F
        if not 1 <= size <= 4:
            raise ValueError(f"unsupported length at byte {offset}")
        length = int.from_bytes(der[content : content + size], "big")
        content += size
    end = content + length
    if end > len(der):
        raise ValueError("truncated")
    return offset, content, end


def parse_pin(pin: object, field: str) -> bytes:
    """A pin's digest, or an error naming ``field`` and what a pin looks like."""
    if not isinstance(pin, str):
        raise TypeError(f"{field}: a pin is a 'sha256/<base64>' string, got {type(pin).__name__}")
    if not pin.startswith(PIN_PREFIX):
        raise ValueError(f"{field}: a pin is 'sha256/<base64>' (of the public key), got {pin!r}")
    try:
        digest = base64.b64decode(pin[len(PIN_PREFIX) :], validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError(f"{field}: {pin!r} is not the base64 of a SHA-256 digest (32 bytes)")
    return digest


def check_pins(pins: object) -> tuple[tuple[tuple[str, int], tuple[bytes, ...]], ...]:
    """Validate the ``pins`` option: relay names to pins, normalised to ((host, port),
    digests) pairs."""
    if isinstance(pins, _CheckedPins):
        return pins  # already checked (a config's replace() passes it on)
    if not isinstance(pins, Mapping):
        raise TypeError(
            f"pins must map a relay ('host:port') to its pin or pins, got {type(pins).__name__}"
        )
    checked: dict[tuple[str, int], tuple[bytes, ...]] = {}
    for target, given in pins.items():
        endpoint = Endpoint.parse(target, field="pins")
        field = f"pins[{str(endpoint)!r}]"  # (its display name: no query, no secret)
        if isinstance(given, str | bytes | bytearray) or not isinstance(given, Sequence):
            given = [given]
        if not given:
            raise ValueError(f"{field}: no pin given")
        address = pin_address(endpoint.host, endpoint.port)
        if address in checked:
            raise ValueError(f"{field}: {endpoint} is pinned twice; put its pins in one list")
        checked[address] = tuple(parse_pin(pin, field) for pin in given)
    return _CheckedPins(checked.items())


def pin_address(host: str, port: int) -> tuple[str, int]:
    """A relay's address as pins are looked up by: one spelling per host (DNS names are
    case-insensitive and may end with a dot; IPv6 has many spellings)."""
    host = host.rstrip(".").lower()
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        with contextlib.suppress(UnicodeError):  # (not a name DNS could carry: as it is)
            host = host.encode("idna").decode("ascii")
    return host, port


class _CheckedPins(tuple[tuple[tuple[str, int], tuple[bytes, ...]], ...]):
    """Pins `check_pins` checked: ((host, port), digests) pairs."""

    __slots__ = ()


def pinned_context(base: ssl.SSLContext) -> ssl.SSLContext:
    """The context of a pinned relay's handshakes: ``base``'s TLS versions (1.2 at least)
    and options, the chain and the name left to the pin (checked by `check_pin` before
    the channel is used). A client certificate in ``base`` does not carry over."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.options = base.options
    with contextlib.suppress(ssl.SSLError):  # (no TLS 1.2 cipher in base: 1.3's suites stand)
        context.set_ciphers(":".join(cipher["name"] for cipher in base.get_ciphers()))
    context.minimum_version = max(base.minimum_version, ssl.TLSVersion.TLSv1_2, key=_rank)
    context.maximum_version = base.maximum_version
    return context


def _rank(version: ssl.TLSVersion) -> int:
    # MINIMUM_SUPPORTED and MAXIMUM_SUPPORTED are negative sentinels: rank them as such.
    if version is ssl.TLSVersion.MINIMUM_SUPPORTED:
        return -(1 << 30)
    if version is ssl.TLSVersion.MAXIMUM_SUPPORTED:
        return 1 << 30
    return int(version)


def check_pin(der: bytes | None, pins: tuple[bytes, ...], endpoint: str) -> None:
    """Raise `ConnectError` (phase ``"pin"``) unless the certificate ``der`` a relay
    showed has one of the pinned keys."""
    if der is None:
        raise ConnectError(endpoint, "pin", "the relay showed no certificate to check its pin")
    try:
        digest = _digest(der)
    except ValueError as exc:
        raise ConnectError(endpoint, "pin", f"its certificate is unreadable: {exc}") from None
    if digest not in pins:
        shown = PIN_PREFIX + base64.b64encode(digest).decode("ascii")
        raise ConnectError(
            endpoint,
            "pin",
            f"its public key {shown} matches none of its pins; if the relay changed its"
            " key, check the new one out of band before pinning it",
        )
