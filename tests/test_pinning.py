"""Certificate pinning: a relay no CA vouches for (self-signed, as many Electrum servers are)
trusted by the SHA-256 of its public key, over real TLS on 127.0.0.1.

The relays here present certificates the client's CA cannot verify: truly self-signed ones
built with ``cryptography``, and leaves of a second trustme CA the client does not trust.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import ssl
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID

import trio_securechannel as sc
from trio_securechannel import BreakerState
from trio_securechannel.testing import LoopbackRelay

from conftest import SERVER_CERT
from helpers import assert_all_slots_free, books, check_out_at_once, echo, wait_until


def self_signed(name: str = "127.0.0.1", *, key: str = "ec") -> trustme.LeafCert:
    """A certificate signed by its own key: no CA to chain it to."""
    private_key: CertificateIssuerPrivateKeyTypes
    if key == "rsa":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key == "ed25519":
        private_key = ed25519.Ed25519PrivateKey.generate()
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alt_name = x509.DNSName(name)
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([alt_name]), critical=False)
        .sign(private_key, None if key == "ed25519" else hashes.SHA256())
    )
    key_pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return trustme.LeafCert(key_pem, certificate.public_bytes(Encoding.PEM), [])


SELF_SIGNED = self_signed()
SELF_SIGNED_RSA = self_signed(key="rsa")
NEW_KEY = self_signed()  # a relay's next key; or simply another key than the pinned one
UNTRUSTED_CA = trustme.CA()  # the client's context never loads it
UNTRUSTED_LEAF = UNTRUSTED_CA.issue_cert("127.0.0.1")

# Certificates the client's CA cannot vouch for, each of which a pin makes trusted.
UNTRUSTED = pytest.mark.parametrize(
    "certificate",
    [
        SELF_SIGNED,
        SELF_SIGNED_RSA,
        UNTRUSTED_LEAF,
        # Neither a trusted chain nor the relay's name (127.0.0.1): a pin checks neither.
        UNTRUSTED_CA.issue_cert("elsewhere.test"),
    ],
    ids=["self-signed EC", "self-signed RSA", "untrusted CA's leaf", "untrusted, other name"],
)


def pem_of(certificate: trustme.LeafCert) -> str:
    return certificate.cert_chain_pems[0].bytes().decode("ascii")


def pin_of(certificate: trustme.LeafCert) -> str:
    return sc.public_key_pin(pem_of(certificate))


def independent_pin(certificate: x509.Certificate) -> str:
    """The pin as ``cryptography`` computes it, sharing no code with the library's."""
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def serving(certificate: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    return context


async def start_relay(nursery: trio.Nursery, certificate: trustme.LeafCert) -> LoopbackRelay:
    relay = LoopbackRelay(tls_context=serving(certificate))
    await nursery.start(relay.serve)
    return relay


def address(relay: LoopbackRelay | LoopbackRelay) -> str:
    """What ``pins`` names a relay by."""
    return f"127.0.0.1:{relay.port}"


def presented_pin(channel: sc.Channel) -> str:
    """The pin of the certificate the relay showed on this channel."""
    der = channel.ssl_stream.getpeercert(binary_form=True)
    assert der is not None
    return sc.public_key_pin(der)


def errors_of(pool: sc.SecureChannelPool, relay: LoopbackRelay) -> dict[str, int]:
    """One relay's failures by kind, as the pool counted them."""
    (status,) = [s for s in pool.status()["endpoints"] if s["target"] == address(relay)]
    errors: dict[str, int] = status["errors_by_kind"]
    return errors


async def hold_at_once(pool: sc.SecureChannelPool, count: int) -> list[sc.SecureChannel]:
    """``count`` checkouts, each echoing once, all held until the last one is lent."""
    lent: list[sc.SecureChannel] = []
    all_lent = trio.Event()

    async def hold() -> None:
        async with pool.connection() as channel:
            assert await echo(channel, b"hello") == b"hello"
            lent.append(channel)
            if len(lent) == count:
                all_lent.set()
            await all_lent.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(hold)
    return lent


# -- trusted by the pin -------------------------------------------------------------------


@UNTRUSTED
async def test_a_pinned_relay_the_ca_cannot_vouch_for_serves_every_new_channel(
    nursery: trio.Nursery, client_context: ssl.SSLContext, certificate: trustme.LeafCert
) -> None:
    relay = await start_relay(nursery, certificate)
    pin = pin_of(certificate)
    async with sc.open_pool(
        relay.target, ssl_context=client_context, pins={address(relay): pin}, max_connections=3
    ) as pool:
        # Three checkouts at once: three handshakes, each checked against the pin.
        lent = await check_out_at_once(pool, 3)
        assert len(lent) == 3
        assert relay.handshakes == 3
        assert {presented_pin(channel) for channel in lent} == {pin}
        async with pool.connection() as channel:  # and pooled channels come back fit
            assert channel in lent
            assert await echo(channel, b"again") == b"again"
        assert relay.handshakes == 3
        assert pool.status()["errors_total"] == 0


async def test_a_relay_with_two_pins_connects_with_either_key(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    # A key rotation: the current key and the next one are pinned together, so the
    # relay may switch keys while the pool runs.
    relay = await start_relay(nursery, SELF_SIGNED)
    old, new = pin_of(SELF_SIGNED), pin_of(NEW_KEY)
    async with sc.open_pool(
        relay.target, ssl_context=client_context, pins={address(relay): [old, new]}
    ) as pool:
        async with pool.connection() as before:
            assert await echo(before, b"old key") == b"old key"
            relay.tls_context = serving(NEW_KEY)  # the relay switches keys
            # ``before`` is still held: this checkout opens a new channel, on the new key.
            async with pool.connection() as after:
                assert await echo(after, b"new key") == b"new key"
        assert presented_pin(before) == old
        assert presented_pin(after) == new
        assert relay.handshakes == 2
        assert pool.status()["errors_total"] == 0


async def test_pins_given_in_a_config_survive_its_replace(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    # open_pool(config=..., **options) copies the config with its already-checked pins.
    relay = await start_relay(nursery, SELF_SIGNED)
    config = sc.PoolConfig(ssl_context=client_context, pins={address(relay): pin_of(SELF_SIGNED)})
    async with sc.open_pool(relay.target, config=config, max_connections=2) as pool:
        assert pool.config.pinned == config.pinned
        async with pool.connection() as channel:
            assert await echo(channel, b"configured") == b"configured"


async def test_a_pinned_relay_and_a_ca_verified_relay_serve_side_by_side(
    nursery: trio.Nursery, relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    pinned = await start_relay(nursery, SELF_SIGNED)
    async with sc.open_pool(
        [pinned.target, relay.target],
        ssl_context=client_context,
        pins={address(pinned): pin_of(SELF_SIGNED)},
        max_connections=1,  # per relay: two channels held at once are one on each
    ) as pool:
        lent = await hold_at_once(pool, 2)
        assert {str(channel.endpoint) for channel in lent} == {address(pinned), address(relay)}
        assert pinned.handshakes == relay.handshakes == 1
        assert pool.status()["errors_total"] == 0


async def test_pins_work_over_a_wss_relay(nursery: trio.Nursery) -> None:
    ws_relay = LoopbackRelay(websocket=True, path="/ws", tls_context=serving(SELF_SIGNED))
    await nursery.start(ws_relay.serve)
    # No ssl_context: the system roots, which know nothing of this relay; the pin is
    # the whole trust, as an Electrum client pins a self-signed server.
    async with sc.open_pool(ws_relay.url, pins={address(ws_relay): pin_of(SELF_SIGNED)}) as pool:
        for _ in range(2):
            async with pool.websocket() as channel:
                await channel.send_message("over wss")
                assert await channel.get_message() == "over wss"
                assert presented_pin(channel) == pin_of(SELF_SIGNED)
        assert ws_relay.upgrades == 1  # the same channel, reused


# -- refused ------------------------------------------------------------------------------


async def test_a_relay_showing_another_key_is_refused_before_a_byte_is_sent(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    relay = await start_relay(nursery, SELF_SIGNED)
    async with sc.open_pool(
        relay.target,
        ssl_context=client_context,
        pins={address(relay): pin_of(NEW_KEY)},
        breaker_failure_threshold=3,
        breaker_cooldown=60.0,
    ) as pool:
        for attempt in range(1, 4):
            with pytest.raises(sc.ConnectError) as info:
                async with pool.connection():
                    pytest.fail("a channel to a relay with another key was lent")
            assert info.value.phase == "pin"
            assert info.value.endpoint == address(relay)
            # The key the relay showed, so its operator (or the user) can compare it.
            assert pin_of(SELF_SIGNED) in str(info.value)
            assert info.value.__cause__ is None
            # Each refusal is a failure to connect, counted for the breaker.
            expected = BreakerState.OPEN if attempt == 3 else BreakerState.CLOSED
            assert pool.breaker_state is expected
        with pytest.raises(sc.CircuitOpen):
            async with pool.connection():
                pytest.fail("the breaker is open")
        assert pool.status()["errors_by_kind"] == {"pin": 3}
        assert books(pool)["in_use"] == books(pool)["opening"] == 0
        await wait_until(lambda: relay.active == 0)  # every connection seen to its end
    assert relay.accepted == 3  # none while the breaker is open
    assert relay.handshakes == 3  # TLS itself succeeded: the pin refused the relay
    assert relay.requests == 0  # and nothing was sent to it


async def test_refusals_leak_no_slot_and_the_pinned_key_is_welcome_after(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    relay = await start_relay(nursery, NEW_KEY)  # not (yet) the pinned key
    async with sc.open_pool(
        relay.target,
        ssl_context=client_context,
        pins={address(relay): pin_of(SELF_SIGNED)},
        max_connections=2,
        breaker_failure_threshold=100,  # the breaker stays out of it
    ) as pool:
        # More refusals than slots: one leaked per refusal would leave none.
        for _ in range(5):
            with pytest.raises(sc.ConnectError, match="sha256/"):
                async with pool.connection():
                    pytest.fail("a channel to a relay with another key was lent")
        assert relay.requests == 0
        relay.tls_context = serving(SELF_SIGNED)  # the relay shows the pinned key again
        await assert_all_slots_free(pool)
        assert books(pool)["opened_total"] == 2  # both slots, on the pinned key
    assert relay.handshakes == 5 + 2


async def test_a_pin_is_checked_even_when_the_ca_would_vouch_for_the_relay(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    # The relay fixture's certificate is valid for the client's CA; with the right pin it
    # is served, with a wrong one it is refused: the pin replaces the CA, it is no
    # fallback after it.
    right = {address(relay): pin_of(SERVER_CERT)}
    async with (
        sc.open_pool(relay.target, ssl_context=client_context, pins=right) as pool,
        pool.connection() as channel,
    ):
        assert await echo(channel, b"right pin") == b"right pin"
    async with sc.open_pool(
        relay.target, ssl_context=client_context, pins={address(relay): pin_of(NEW_KEY)}
    ) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pytest.fail("a channel to a relay with another key was lent")
        assert info.value.phase == "pin"
        assert pin_of(SERVER_CERT) in str(info.value)
    assert relay.handshakes == 2
    assert relay.requests == 1  # the right pin's echo only


async def test_a_wss_relay_showing_another_key_is_refused_before_its_upgrade(
    nursery: trio.Nursery,
) -> None:
    ws_relay = LoopbackRelay(websocket=True, path="/ws", tls_context=serving(SELF_SIGNED))
    await nursery.start(ws_relay.serve)
    async with sc.open_pool(ws_relay.url, pins={address(ws_relay): pin_of(NEW_KEY)}) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.websocket():
                pytest.fail("a channel to a relay with another key was lent")
        assert info.value.phase == "pin"
        assert pin_of(SELF_SIGNED) in str(info.value)
    assert ws_relay.upgrades == 0  # no upgrade request (with its headers) was sent


@UNTRUSTED
async def test_an_unpinned_relay_the_ca_cannot_vouch_for_is_refused(
    nursery: trio.Nursery, client_context: ssl.SSLContext, certificate: trustme.LeafCert
) -> None:
    relay = await start_relay(nursery, certificate)
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        with pytest.raises(sc.ConnectError) as info:
            async with pool.connection():
                pytest.fail("an unverified channel was lent")
        assert info.value.phase == "tls"
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        await wait_until(lambda: relay.active == 0)
    assert relay.handshakes == relay.requests == 0


async def test_a_pin_for_one_relay_lowers_no_bar_for_another(
    nursery: trio.Nursery, client_context: ssl.SSLContext
) -> None:
    pinned = await start_relay(nursery, SELF_SIGNED)
    unpinned = await start_relay(nursery, NEW_KEY)  # self-signed too, but not pinned
    async with (
        sc.open_pool(
            [pinned.target, unpinned.target],
            ssl_context=client_context,
            pins={address(pinned): pin_of(SELF_SIGNED)},
            max_connections=1,
            acquire_timeout=5.0,
        ) as pool,
        trio.open_nursery() as holders,
    ):
        release = trio.Event()

        async def hold(*, task_status: trio.TaskStatus[sc.SecureChannel]) -> None:
            async with pool.connection() as channel:
                task_status.started(channel)
                await release.wait()

        # Only the pinned relay can lend a channel; now it has no room left.
        first = await holders.start(hold)
        assert str(first.endpoint) == address(pinned)
        tried = errors_of(pool, unpinned).get("tls", 0)
        served: list[sc.SecureChannel] = []

        async def check_out_second() -> None:
            async with pool.connection() as channel:
                assert await echo(channel, b"second") == b"second"
                served.append(channel)

        holders.start_soon(check_out_second)
        # The second checkout tries the relay with room, which fails its verification...
        await wait_until(lambda: errors_of(pool, unpinned).get("tls", 0) == tried + 1)
        release.set()  # ... then waits for the pinned one.
    assert [str(channel.endpoint) for channel in served] == [address(pinned)]
    assert errors_of(pool, pinned) == {}
    assert unpinned.handshakes == unpinned.requests == 0


# -- public_key_pin -----------------------------------------------------------------------


KEYS = pytest.mark.parametrize(
    "certificate",
    [
        SELF_SIGNED,
        SELF_SIGNED_RSA,
        self_signed(key="ed25519"),
        UNTRUSTED_LEAF,
        UNTRUSTED_CA.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA),
    ],
    ids=["self-signed EC", "self-signed RSA", "self-signed Ed25519", "EC leaf", "RSA leaf"],
)


def as_der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


@KEYS
@pytest.mark.parametrize(
    "form",
    [
        as_der,
        lambda pem: bytearray(as_der(pem)),
        lambda pem: pem,
        lambda pem: pem.replace("\n", "\r\n"),
        # What `openssl x509 -text` prints: the certificate after a description of it.
        lambda pem: "Certificate:\n    Data:\n        Version: 3 (0x2)\n" + pem,
        lambda pem: pem + UNTRUSTED_CA.cert_pem.bytes().decode("ascii"),  # leaf first
    ],
    ids=["DER", "DER bytearray", "PEM", "PEM CRLF", "PEM after text", "PEM chain"],
)
def test_public_key_pin_is_the_sha256_of_the_subject_public_key_info(
    certificate: trustme.LeafCert, form: Any
) -> None:
    pem = pem_of(certificate)
    expected = independent_pin(x509.load_pem_x509_certificate(pem.encode("ascii")))
    assert sc.public_key_pin(form(pem)) == expected


def test_public_key_pin_of_a_chain_is_its_first_certificates() -> None:
    leaf, root = pem_of(UNTRUSTED_LEAF), UNTRUSTED_CA.cert_pem.bytes().decode("ascii")
    root_pin = independent_pin(x509.load_pem_x509_certificate(root.encode("ascii")))
    assert sc.public_key_pin(leaf + root) == pin_of(UNTRUSTED_LEAF)
    assert sc.public_key_pin(root + leaf) == root_pin != pin_of(UNTRUSTED_LEAF)


def test_a_pin_is_the_same_for_a_renewed_certificate_with_the_same_key() -> None:
    # Why pins are of the key, not of the certificate: a renewal keeps them valid.
    original = x509.load_pem_x509_certificate(pem_of(SELF_SIGNED).encode("ascii"))
    key = SELF_SIGNED.private_key_pem.bytes()
    renewal = trustme.LeafCert(key, self_renewed(original, key).public_bytes(Encoding.PEM), [])
    assert pem_of(renewal) != pem_of(SELF_SIGNED)
    assert pin_of(renewal) == pin_of(SELF_SIGNED)


def self_renewed(original: x509.Certificate, key_pem: bytes) -> x509.Certificate:
    private_key = load_pem_private_key(key_pem, password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(original.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=365))
        .sign(private_key, hashes.SHA256())
    )


SPKI_DER = (
    x509.load_pem_x509_certificate(pem_of(SELF_SIGNED).encode("ascii"))
    .public_key()
    .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
)


@pytest.mark.parametrize(
    ("not_a_certificate", "words"),
    [
        (b"", "not a DER certificate"),
        (b"not a certificate", "not a DER certificate"),
        (SPKI_DER, "not a DER certificate"),  # a public key alone
        (as_der(pem_of(SELF_SIGNED))[:-1], "not a DER certificate"),  # truncated
        ("", "not a PEM certificate"),
        (SELF_SIGNED.private_key_pem.bytes().decode("ascii"), "not a PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "not a DER"),
    ],
    ids=["empty DER", "text as DER", "public key", "truncated", "empty PEM", "key PEM", "junk"],
)
def test_public_key_pin_refuses_what_is_not_a_certificate(
    not_a_certificate: bytes | str, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        sc.public_key_pin(not_a_certificate)


@pytest.mark.parametrize("other", [None, 42, [pem_of(SELF_SIGNED)]], ids=["None", "int", "list"])
def test_public_key_pin_takes_only_bytes_or_text(other: Any) -> None:
    with pytest.raises(TypeError, match=f"DER bytes or PEM text, got {type(other).__name__}"):
        sc.public_key_pin(other)


# -- validating the pins option -----------------------------------------------------------

PIN = pin_of(SELF_SIGNED)
SHA1_SIZED = "sha256/" + base64.b64encode(b"\x00" * 20).decode("ascii")


@pytest.mark.parametrize(
    ("pins", "error", "words"),
    [
        (
            {"127.0.0.1:700": "md5/" + PIN[7:]},
            ValueError,
            "pins['127.0.0.1:700']: a pin is 'sha256/<base64>' (of the public key), got 'md5/",
        ),
        (
            {"127.0.0.1:700": PIN[7:]},  # the digest without its prefix
            ValueError,
            "pins['127.0.0.1:700']: a pin is 'sha256/<base64>'",
        ),
        (
            {"127.0.0.1:700": "sha256/not base64!"},
            ValueError,
            "pins['127.0.0.1:700']: 'sha256/not base64!' is not the base64 of a SHA-256 digest",
        ),
        (
            {"127.0.0.1:700": SHA1_SIZED},
            ValueError,
            f"pins['127.0.0.1:700']: {SHA1_SIZED!r} is not the base64 of a SHA-256 digest"
            " (32 bytes)",
        ),
        (
            {"127.0.0.1:700": 42},
            TypeError,
            "pins['127.0.0.1:700']: a pin is a 'sha256/<base64>' string, got int",
        ),
        (
            {"127.0.0.1:700": [PIN, None]},  # one good pin does not excuse a bad one
            TypeError,
            "pins['127.0.0.1:700']: a pin is a 'sha256/<base64>' string, got NoneType",
        ),
        ({"127.0.0.1:700": []}, ValueError, "pins['127.0.0.1:700']: no pin given"),
        ({"127.0.0.1": PIN}, ValueError, "pins: "),  # no port
        ([PIN], TypeError, "pins must map a relay ('host:port') to its pin or pins, got list"),
        (PIN, TypeError, "pins must map a relay ('host:port') to its pin or pins, got str"),
    ],
    ids=[
        "md5",
        "no prefix",
        "bad base64",
        "wrong digest length",
        "not a str",
        "bad pin in a list",
        "empty list",
        "relay without port",
        "a list",
        "a bare pin",
    ],
)
def test_a_malformed_pin_is_refused_naming_it(
    pins: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=re.escape(words)):
        sc.open_pool("127.0.0.1:700", pins=pins)
    with pytest.raises(error, match=re.escape(words)):
        sc.PoolConfig(pins=pins)


@pytest.mark.parametrize(
    ("target", "pinned"),
    [
        ("127.0.0.1:700", "127.0.0.1:701"),  # a typo in the port
        ("127.0.0.1:700", "localhost:700"),  # the same machine, named otherwise
        (["127.0.0.1:700", "wss://127.0.0.1:702/ws"], "127.0.0.1:701"),
    ],
    ids=["other port", "other name", "among several"],
)
def test_a_pin_for_a_relay_the_pool_does_not_have_is_refused(target: Any, pinned: str) -> None:
    # It would leave the relay meant unpinned, and so refused (or verified by the CA).
    words = f"pins: {pinned} is not one of the pool's relays"
    with pytest.raises(ValueError, match=re.escape(words)):
        sc.open_pool(target, pins={pinned: PIN})


def test_a_wss_relay_is_pinned_by_its_host_and_port() -> None:
    # No error: the relay behind the URL is 127.0.0.1:702, whatever its path.
    sc.open_pool(["127.0.0.1:700", "wss://127.0.0.1:702/ws"], pins={"127.0.0.1:702": PIN})


@pytest.mark.parametrize("spelling", ["LOCALHOST:{port}", "localhost.:{port}", "LocalHost.:{port}"])
async def test_a_pin_finds_its_relay_however_the_name_is_spelt(
    relay: LoopbackRelay, spelling: str
) -> None:
    # DNS names are case-insensitive and may end with a dot: one relay, one pin.
    pin = sc.public_key_pin(SERVER_CERT.cert_chain_pems[0].bytes())
    async with (
        sc.open_pool(
            f"localhost:{relay.port}", pins={spelling.format(port=relay.port): pin}
        ) as pool,
        pool.connection() as channel,
    ):
        assert await echo(channel, b"ping") == b"ping"
