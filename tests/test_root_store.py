"""The root store (FAULTS rows 4, 5, 20, 21) and the checks on user-supplied contexts."""

from __future__ import annotations

import logging
import os
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from trio_securechannel._tls import check_client_context, load_root_store

CA = trustme.CA()
OTHER_CAS = (trustme.CA(), trustme.CA())
SERVER_CERT = CA.issue_cert("localhost")

GOOD_PEMS = [ca.cert_pem.bytes().decode("ascii") for ca in (CA, *OTHER_CAS)]
BEGIN, END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
GARBAGE_BODY = "Tm90IGEgY2VydGlmaWNhdGUsIGp1c3QgZ2FyYmFnZSBpbiBiYXNlNjQh"


def write_bundle(path: Path, *blocks: str) -> Path:
    path.write_text("".join(blocks), encoding="utf-8")
    return path


def cert_dir_with(tmp_path: Path, *files: tuple[str, str]) -> Path:
    """An ``SSL_CERT_DIR``-style directory holding ``(name, PEM text)`` files."""
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    for name, pem in files:
        write_bundle(cert_dir / name, pem)
    return cert_dir


def ca_count(ctx: ssl.SSLContext) -> int:
    return ctx.cert_store_stats()["x509_ca"]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "trio_securechannel" and record.levelno >= logging.WARNING
    ]


def server_context(*, max_tls_1_1: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    SERVER_CERT.configure_cert(ctx)
    if max_tls_1_1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1, rightly so
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the old server do its best
    return ctx


async def echo_over_tls(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> bytes:
    """Handshake as a client over an in-memory pair, send b"ping", return the echo."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=hostname)
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)

    async def echo_once() -> None:
        try:
            await server.send_all(await server.receive_some())
        except trio.BrokenResourceError:
            pass  # the client refused us; what the client sees is what we assert
        finally:
            await trio.aclose_forcefully(server)  # so a refused client is not left waiting

    error: trio.BrokenResourceError | None = None
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_once)
            try:
                await client.send_all(b"ping")
                reply = await client.receive_some()
            except trio.BrokenResourceError as exc:
                error = exc  # re-raised below, bare rather than in an ExceptionGroup
            finally:
                await trio.aclose_forcefully(client)
    if error is not None:
        raise error
    return bytes(reply)


# -- the context we hand out ------------------------------------------------------------------


def test_context_is_a_strict_tls12_client(tmp_path: Path) -> None:
    ctx = load_root_store(write_bundle(tmp_path / "ca.pem", GOOD_PEMS[0]))
    assert ctx.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert check_client_context(ctx) is ctx


@pytest.mark.parametrize("as_str", [False, True])
def test_good_bundle_loads_every_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, as_str: bool
) -> None:
    bundle = write_bundle(tmp_path / "ca.pem", "# a comment\n", *GOOD_PEMS)
    ctx = load_root_store(str(bundle) if as_str else bundle)
    assert ca_count(ctx) == 3
    subjects = {cert["subject"] for cert in ctx.get_ca_certs()}
    assert len(subjects) == 3
    assert warnings_logged(caplog) == []


@pytest.mark.parametrize("cafile", [b"/etc/ssl/ca.pem", 42, ["ca.pem"]])
def test_wrong_type_cafile_is_a_type_error(cafile: object) -> None:
    with pytest.raises(TypeError, match="cafile"):
        load_root_store(cafile)  # type: ignore[arg-type]


# -- row 20: one corrupt block among good ones ------------------------------------------------

TRUNCATED = GOOD_PEMS[1][: len(GOOD_PEMS[1]) // 2]  # BEGIN and half a body, no END


@pytest.mark.parametrize(
    ("bad_block", "position"),
    [
        pytest.param(f"{BEGIN}\n{GARBAGE_BODY}\n{END}\n", 1, id="base64-garbage"),
        pytest.param(f"{BEGIN}\n!!not*base64*at*all!!\n{END}\n", 1, id="not-base64"),
        pytest.param(f"{BEGIN}\n{END}\n", 1, id="empty-block"),
        pytest.param(
            GOOD_PEMS[1].replace("M", "\N{LATIN SMALL LETTER E WITH ACUTE}"), 1, id="non-ascii"
        ),
        pytest.param(TRUNCATED, 1, id="truncated-in-the-middle"),
        pytest.param(TRUNCATED, 2, id="truncated-at-the-end"),
    ],
)
def test_corrupt_block_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad_block: str, position: int
) -> None:
    blocks = [GOOD_PEMS[0], GOOD_PEMS[2]]
    blocks.insert(position, bad_block)
    bundle = write_bundle(tmp_path / "bundle.pem", *blocks)

    ctx = load_root_store(bundle)

    assert ca_count(ctx) == 2
    loaded = {cert["serialNumber"] for cert in ctx.get_ca_certs()}
    assert len(loaded) == 2
    [message] = warnings_logged(caplog)
    assert f"block {position} " in message
    assert str(bundle) in message
    # Never the certificate data, good or bad, in the logs.
    assert "BEGIN CERTIFICATE" not in caplog.text
    assert "-----" not in caplog.text
    for pem in (*blocks, GOOD_PEMS[1]):
        for line in pem.splitlines():
            if line and not line.startswith("-----"):
                assert line not in caplog.text


# -- row 21: nothing usable, a warning and an empty store ------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage-only", "directory", "all-bad"])
def test_unusable_bundle_gives_a_warning_and_an_empty_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    path = tmp_path / "ca.pem"
    if kind == "empty":
        path.write_text("")
    elif kind == "garbage-only":
        path.write_bytes(b"\x00\xffthis is not PEM at all\n" * 10)
    elif kind == "directory":
        path.mkdir()
        write_bundle(path / "inside.pem", *GOOD_PEMS)  # a directory is not a bundle
    elif kind == "all-bad":
        write_bundle(path, f"{BEGIN}\n{GARBAGE_BODY}\n{END}\n")

    ctx = load_root_store(path)

    assert ctx.cert_store_stats() == {"x509": 0, "crl": 0, "x509_ca": 0}
    assert ctx.get_ca_certs() == []
    messages = warnings_logged(caplog)
    summary = messages[-1]
    assert str(path) in summary
    assert "handshake will fail" in summary
    assert len(messages) == (2 if kind == "all-bad" else 1)  # all-bad: the block, then this


@pytest.mark.parametrize("kind", ["missing", "wrong-ca"])
async def test_untrusted_server_fails_closed(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ca.pem"
    if kind == "wrong-ca":
        write_bundle(path, *GOOD_PEMS[1:])
    ctx = load_root_store(path)
    with pytest.raises(trio.BrokenResourceError) as info:
        await echo_over_tls(ctx, server_context())
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert info.value.__cause__.verify_message == "unable to get local issuer certificate"


async def test_right_ca_echoes(tmp_path: Path) -> None:
    ctx = load_root_store(write_bundle(tmp_path / "ca.pem", *GOOD_PEMS))
    assert await echo_over_tls(ctx, server_context()) == b"ping"


async def test_wrong_hostname_fails_closed(tmp_path: Path) -> None:
    ctx = load_root_store(write_bundle(tmp_path / "ca.pem", GOOD_PEMS[0]))
    with pytest.raises(trio.BrokenResourceError) as info:
        await echo_over_tls(ctx, server_context(), hostname="elsewhere.test")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(info.value.__cause__)


# -- row 5: never below TLS 1.2 ---------------------------------------------------------------


@pytest.mark.parametrize("legacy_ciphers", [False, True])
async def test_tls_1_1_server_is_refused(tmp_path: Path, legacy_ciphers: bool) -> None:
    ctx = load_root_store(write_bundle(tmp_path / "ca.pem", GOOD_PEMS[0]))
    if legacy_ciphers:
        # OpenSSL 3's default security level alone already rules out TLS 1.1 suites;
        # lifting it leaves our minimum_version as the only thing refusing the server.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(trio.BrokenResourceError) as info:
        await echo_over_tls(ctx, server_context(max_tls_1_1=True))
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert not isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_tls_1_1_server_is_otherwise_reachable(tmp_path: Path) -> None:
    # The control for the test above: the same client, allowed below TLS 1.2, gets
    # through, so the refusal there is our minimum version, not a broken old server.
    ctx = load_root_store(write_bundle(tmp_path / "ca.pem", GOOD_PEMS[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        reply = await echo_over_tls(ctx, server_context(max_tls_1_1=True))
    except trio.BrokenResourceError:
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all")
    assert reply == b"ping"


# -- the system roots -------------------------------------------------------------------------


def test_ssl_cert_file_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    empty_dir = tmp_path / "certs"
    empty_dir.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(write_bundle(tmp_path / "env.pem", *GOOD_PEMS)))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty_dir))
    assert ca_count(load_root_store()) == 3
    assert warnings_logged(caplog) == []


def test_ssl_cert_dir_is_honoured_next_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = cert_dir_with(tmp_path, ("one.pem", GOOD_PEMS[1]), ("two.pem", GOOD_PEMS[2]))
    (cert_dir / "0a1b2c3d.0").symlink_to(cert_dir / "two.pem")  # hashed-dir duplicate
    (cert_dir / "README").write_text("not a certificate\n")
    (cert_dir / "subdir").mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(write_bundle(tmp_path / "env.pem", GOOD_PEMS[0])))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert_dir))
    assert ca_count(load_root_store()) == 3
    assert warnings_logged(caplog) == []


def test_default_verify_paths_without_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    write_bundle(cert_dir / "third.pem", GOOD_PEMS[2])
    cafile = write_bundle(tmp_path / "default.pem", *GOOD_PEMS[:2])
    defaults = ssl.DefaultVerifyPaths(str(cafile), str(cert_dir), "", "", "", "")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: defaults)
    assert ca_count(load_root_store()) == 3
    assert warnings_logged(caplog) == []


def test_missing_ssl_cert_file_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nowhere.pem"
    monkeypatch.setenv("SSL_CERT_FILE", str(missing))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    ctx = load_root_store()
    assert ctx.get_ca_certs() == []
    [message] = warnings_logged(caplog)
    assert str(missing) in message
    assert "handshake will fail" in message


# -- check_client_context: refuse, never silently downgrade -----------------------------------


def _server_side() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def _cert_none() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _no_hostname_check() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return ctx


def _minimum(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
    return ctx


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(_server_side, "server-side", id="server-context"),
        pytest.param(_cert_none, "verify_mode", id="cert-none"),
        pytest.param(_no_hostname_check, "check_hostname", id="no-hostname-check"),
        pytest.param(lambda: _minimum(ssl.TLSVersion.TLSv1), "minimum_version", id="tls1"),
        pytest.param(lambda: _minimum(ssl.TLSVersion.TLSv1_1), "minimum_version", id="tls1.1"),
        pytest.param(
            lambda: _minimum(ssl.TLSVersion.MINIMUM_SUPPORTED), "minimum_version", id="min"
        ),
    ],
)
def test_unsafe_context_is_refused(make: Callable[[], ssl.SSLContext], words: str) -> None:
    ctx = make()
    with pytest.raises(ValueError, match=rf"^ssl_context\b.*{words}"):
        check_client_context(ctx)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_safe_context_is_returned_unchanged(version: ssl.TLSVersion) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = version
    assert check_client_context(ctx) is ctx
    assert ctx.minimum_version == version


@pytest.mark.parametrize("value", [None, "ssl", object()])
def test_non_context_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=r"^ssl_context must be an ssl\.SSLContext"):
        check_client_context(value)


def test_field_name_is_used_in_messages() -> None:
    with pytest.raises(ValueError, match=r"^relay_tls\.check_hostname"):
        check_client_context(_no_hostname_check(), field="relay_tls")


# -- a loop, a device or a huge file among the roots: that entry only, with a warning --------


def test_symlink_loop_in_cert_dir_costs_only_that_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = cert_dir_with(tmp_path, ("one.pem", GOOD_PEMS[1]), ("two.pem", GOOD_PEMS[2]))
    loop = cert_dir / "5d0f1a2b.0"
    loop.symlink_to(loop.name)  # points at itself: resolving it never ends
    monkeypatch.setenv("SSL_CERT_FILE", str(write_bundle(tmp_path / "env.pem", GOOD_PEMS[0])))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert_dir))

    ctx = load_root_store()

    assert ca_count(ctx) == 3  # the bundle's root and both good files of the directory
    [message] = warnings_logged(caplog)
    assert str(loop) in message
    assert "symbolic links" in message


def test_symlink_loop_as_ssl_cert_file_keeps_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = cert_dir_with(tmp_path, ("one.pem", GOOD_PEMS[1]))
    first, second = tmp_path / "a.pem", tmp_path / "b.pem"
    first.symlink_to(second)
    second.symlink_to(first)
    monkeypatch.setenv("SSL_CERT_FILE", str(first))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert_dir))

    ctx = load_root_store()

    assert ca_count(ctx) == 1
    [message] = warnings_logged(caplog)
    assert str(first) in message
    assert "symbolic links" in message


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "ca.fifo"
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp_path: Path("/dev/zero"), id="dev-zero"),
        pytest.param(_fifo, id="fifo"),
    ],
)
def test_non_regular_bundle_is_refused_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Callable[[Path], Path]
) -> None:
    path = make(tmp_path)

    ctx = load_root_store(path)

    assert ctx.get_ca_certs() == []  # as for any unusable bundle: empty, fail closed
    [message] = warnings_logged(caplog)
    assert str(path) in message
    assert "not a regular file" in message
    assert "handshake will fail" in message


def test_dev_zero_as_ssl_cert_file_keeps_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = cert_dir_with(tmp_path, ("one.pem", GOOD_PEMS[1]), ("two.pem", GOOD_PEMS[2]))
    (cert_dir / "3c4d5e6f.0").symlink_to("/dev/zero")  # in the directory: passed over
    monkeypatch.setenv("SSL_CERT_FILE", "/dev/zero")
    monkeypatch.setenv("SSL_CERT_DIR", str(cert_dir))

    ctx = load_root_store()

    assert ca_count(ctx) == 2
    [message] = warnings_logged(caplog)
    assert "/dev/zero" in message
    assert "not a regular file" in message


def _huge(path: Path, *blocks: str) -> Path:
    """A sparse file just over the 32 MiB cap: good certificates, then zeros."""
    write_bundle(path, *blocks)
    with path.open("r+b") as file:
        file.truncate((32 << 20) + 1)
    return path


def test_huge_bundle_is_refused_unread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = _huge(tmp_path / "ca.pem", *GOOD_PEMS)

    ctx = load_root_store(bundle)

    assert ctx.get_ca_certs() == []
    [message] = warnings_logged(caplog)
    assert str(bundle) in message
    assert "larger than 32 MiB" in message
    assert "handshake will fail" in message


def test_huge_file_in_cert_dir_costs_only_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert_dir = cert_dir_with(tmp_path, ("one.pem", GOOD_PEMS[1]))
    huge = _huge(cert_dir / "two.pem", GOOD_PEMS[2])
    monkeypatch.setenv("SSL_CERT_FILE", str(write_bundle(tmp_path / "env.pem", GOOD_PEMS[0])))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert_dir))

    ctx = load_root_store()

    assert ca_count(ctx) == 2
    [message] = warnings_logged(caplog)
    assert str(huge) in message
    assert "larger than 32 MiB" in message
