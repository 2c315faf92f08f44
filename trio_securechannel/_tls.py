"""Client TLS contexts: the root store we trust and the checks on user contexts."""

from __future__ import annotations

import errno
import logging
import os
import re
import ssl
import stat
from pathlib import Path

logger = logging.getLogger("trio_securechannel")

_BEGIN = "-----BEGIN CERTIFICATE-----"
_END = "-----END CERTIFICATE-----"
_SAFE_MINIMUM_VERSIONS = frozenset({ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3})

#: The most read of a CA bundle, or of one file of a CA directory: system bundles hold
#: well under 1 MiB. A bigger file is no bundle (or a mistake) and is refused unread.
MAX_CA_FILE_BYTES = 32 << 20


def load_root_store(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """Create a client TLS context that trusts exactly the given root certificates.

    Certificates are loaded one by one, so a single corrupt block in a bundle costs
    only that certificate: it is skipped with a warning giving its 0-based index and
    the reason, never its PEM text. A bundle that is missing, unreadable, empty or
    holds no usable certificate gives a warning and an empty store, so every
    handshake then fails certificate verification (fail closed). So does a bundle that
    is not a regular file (``/dev/zero``, a FIFO) or is larger than 32 MiB: it is refused
    unread. In a CA directory, an entry that is a symlink loop or a file over 32 MiB is
    skipped with a warning naming it; the other entries still count.

    Args:
        cafile: A PEM bundle of trusted roots. When ``None``, the system roots are
            used: ``$SSL_CERT_FILE`` (else the default CA file) and ``$SSL_CERT_DIR``
            (else the default CA directory), as OpenSSL itself would.

    Returns:
        A fresh ``PROTOCOL_TLS_CLIENT`` context requiring a verified certificate and a
        matching hostname, and refusing anything below TLS 1.2.

    Raises:
        TypeError: If ``cafile`` is not a ``str`` or ``os.PathLike`` path.
    """
    bundle = os.fspath(cafile) if isinstance(cafile, os.PathLike) else cafile
    if not isinstance(bundle, (str, type(None))):
        raise TypeError(f"cafile must be a str or os.PathLike path, got {type(cafile).__name__}")

    # PROTOCOL_TLS_CLIENT already means CERT_REQUIRED and check_hostname; no
    # load_default_certs(), which would add roots behind the caller's back.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    problems: list[str] = []
    if bundle is None:
        loaded, skipped, sources = _load_system_roots(ctx, problems)
    else:
        loaded, skipped = _load_bundle(ctx, Path(bundle), problems)
        sources = bundle

    if loaded == 0:
        reasons = "; ".join(problems) or f"{sources}: no certificate found"
        logger.warning(
            "No trusted root certificates loaded (%s); the root store is empty "
            "and every TLS handshake will fail",
            reasons,
        )
    else:
        for problem in problems:
            logger.warning("Ignoring CA source %s", problem)
    # The store count, not the blocks loaded: hashed directories repeat the bundle.
    logger.info(
        "Root store from %s: %d certificates (%d blocks loaded, %d skipped)",
        sources,
        ctx.cert_store_stats()["x509"],
        loaded,
        skipped,
    )
    return ctx


def check_client_context(ctx: object, *, field: str = "ssl_context") -> ssl.SSLContext:
    """Check that a user-supplied context is safe for client connections.

    We refuse rather than fix: silently changing the caller's context could hide a
    downgrade they did not mean to make.

    Args:
        ctx: The context to check.
        field: The configuration field name used in error messages.

    Returns:
        ``ctx`` unchanged.

    Raises:
        TypeError: If ``ctx`` is not an ``ssl.SSLContext``.
        ValueError: If ``ctx`` is server-side, does not verify certificates or
            hostnames, or allows a protocol older than TLS 1.2.
    """
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"{field} must be an ssl.SSLContext, got {type(ctx).__name__}")
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError(
            f"{field} is a server-side context; create it with "
            "ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) or load_root_store()"
        )
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError(
            f"{field}.verify_mode must be ssl.CERT_REQUIRED, got {ctx.verify_mode.name}; "
            "certificate verification is never disabled"
        )
    if not ctx.check_hostname:
        raise ValueError(
            f"{field}.check_hostname must be True; the server's hostname is always checked"
        )
    if ctx.minimum_version not in _SAFE_MINIMUM_VERSIONS:
        raise ValueError(
            f"{field}.minimum_version must be TLSv1_2 or TLSv1_3, got "
            f"{ctx.minimum_version.name}; set it to ssl.TLSVersion.TLSv1_2"
        )
    return ctx


def _load_system_roots(ctx: ssl.SSLContext, problems: list[str]) -> tuple[int, int, str]:
    """Load ``$SSL_CERT_FILE``/``$SSL_CERT_DIR``, each falling back to OpenSSL's default."""
    defaults = ssl.get_default_verify_paths()
    cafile = os.environ.get("SSL_CERT_FILE") or defaults.cafile
    capath = os.environ.get("SSL_CERT_DIR") or defaults.capath
    loaded = skipped = 0
    seen: set[str] = set()
    if cafile:
        loaded, skipped = _load_bundle(ctx, Path(cafile), problems)
        seen.add(os.path.realpath(cafile))  # (a loop is resolved as far as it goes)
    if capath:
        try:
            entries = sorted(Path(capath).iterdir())
        except OSError as exc:
            problems.append(f"{capath}: cannot list it ({exc.strerror or exc})")
            entries = []
        for entry in entries:
            # Hashed directories hold symlinks to the same files (and often the bundle
            # itself) and non-PEM files: read each real file once, quietly.
            try:
                is_file = stat.S_ISREG(entry.stat().st_mode)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a dangling link is quietly passed over
                    logger.warning("Skipping CA directory entry %s: %s", entry, exc.strerror)
                continue
            real = os.path.realpath(entry)
            if is_file and real not in seen:
                seen.add(real)
                found: list[str] = []
                counts = _load_bundle(ctx, entry, found, quiet=True)
                loaded, skipped = loaded + counts[0], skipped + counts[1]
                for problem in found:
                    logger.warning("Skipping CA directory entry %s", problem)
    sources = " and ".join(source for source in (cafile, capath) if source) or "nowhere"
    return loaded, skipped, sources


def _load_bundle(
    ctx: ssl.SSLContext, path: Path, problems: list[str], *, quiet: bool = False
) -> tuple[int, int]:
    """Load every certificate block of one PEM file; return (loaded, skipped).

    ``quiet`` (a file of a CA directory): only a file over the size cap is a problem.
    """
    try:
        text = _read_pem(path)
    except _TooLarge as exc:
        problems.append(f"{path}: {exc}")
        return 0, 0
    except (OSError, ValueError) as exc:
        if not quiet:
            problems.append(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})")
        return 0, 0
    loaded = skipped = 0
    for index, block in enumerate(_split_blocks(text)):
        reason = _load_block(ctx, block)
        if reason is None:
            loaded += 1
        else:
            skipped += 1
            logger.warning("Skipping certificate block %d of CA bundle %s: %s", index, path, reason)
    if loaded == 0 and not quiet:
        problems.append(
            f"{path}: no usable certificate" if skipped else f"{path}: no PEM certificate in it"
        )
    return loaded, skipped


class _TooLarge(ValueError):
    """A file over `MAX_CA_FILE_BYTES`."""


def _read_pem(path: Path) -> str:
    """Read a PEM file of at most `MAX_CA_FILE_BYTES`, as ASCII (anything else inside a
    block makes only that block bad).

    Raises:
        OSError: It cannot be opened or read, or is not a regular file (a device such
            as ``/dev/zero`` would be read forever, a FIFO would wait for a writer).
        _TooLarge: It is larger than the cap.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # checked before opening a device
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    # O_NONBLOCK: should it have become a FIFO since, opening it does not wait.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    with open(os.open(path, flags), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = file.read(MAX_CA_FILE_BYTES + 1)
    if len(data) > MAX_CA_FILE_BYTES:
        raise _TooLarge(f"larger than {MAX_CA_FILE_BYTES >> 20} MiB, not a CA bundle")
    return data.decode("ascii", errors="replace")


def _split_blocks(text: str) -> list[str | None]:
    """Split a PEM bundle into certificate blocks; ``None`` for a block without END."""
    blocks: list[str | None] = []
    for part in text.split(_BEGIN)[1:]:
        body, end, _ = part.partition(_END)
        blocks.append(f"{_BEGIN}{body}{_END}\n" if end else None)
    return blocks


def _load_block(ctx: ssl.SSLContext, block: str | None) -> str | None:
    """Add one certificate to the store; return why it failed, or ``None``."""
    if block is None:
        return "truncated block: no END marker"
    if not block.isascii():
        return "non-ASCII characters in the block"
    try:
        ctx.load_verify_locations(cadata=block)
    except ssl.SSLError as exc:
        # The OpenSSL reason or short message, never the data itself.
        message = str(exc.reason or exc.strerror or type(exc).__name__)
        return re.sub(r" \(_ssl\.c:\d+\)$", "", message)
    except ValueError as exc:
        return str(exc)
    return None
