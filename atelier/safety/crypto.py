"""Secrets and encryption at rest: installation secrets, and sealing blobs with AES-256-GCM.

Every blob (model weights, uploaded files, generated artifacts) is written sealed:

    MAGIC (8 bytes) ‖ nonce (12 random bytes) ‖ AES-256-GCM(key, nonce, data, aad=MAGIC)

so a copy of `blobs/` without the key reveals nothing but sizes and the plaintexts'
sha256 names (content addressing is over the plaintext, so identical uploads still
deduplicate), and a flipped bit is caught by the GCM tag instead of being served. Blobs
written before encryption was turned on stay readable (no MAGIC: plain bytes).

The data key comes from `ATELIER_SECRET_KEY` (base64, 32 bytes), else the file
`ATELIER_SECRET_KEY_FILE` (default `<home>/secret.key`, created on first start, mode
0600). Keeping the key file off the machine that holds the data (or the key in the
environment from a secret manager) is what makes the encryption protect anything; the
default protects copies and backups of `blobs/` alone. `blobs/key-check` holds a sealed
canary, so starting with the wrong key fails at once with a clear message instead of
failing on the first model load.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"ATLSEAL1"
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_FILE = "secret.key"
CHECK_FILE = "key-check"
CANARY = b"atelier data key check"


class SealError(Exception):
    """A sealed blob cannot be opened: no key, the wrong key, or tampered bytes."""


def create_secret_once(path: Path, size: int = KEY_BYTES) -> bytes:
    """A random secret stored at `path` (0600), created once and read back afterwards.

    Created with a hard link from a fully written temp file, so two processes starting
    together agree on one secret and nobody ever reads a half-written one.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(size))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its secret
        finally:
            os.unlink(tmp)
    data = path.read_bytes()
    if len(data) != size:
        raise ValueError(f"{path} is not a {size}-byte secret")
    return data


def seal(key: bytes, data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, MAGIC)


def is_sealed(raw: bytes) -> bool:
    return raw[:len(MAGIC)] == MAGIC


def unseal(key: bytes | None, raw: bytes) -> bytes:
    if key is None:
        raise SealError("this blob is encrypted and the server has no data key (ATELIER_ENCRYPT_AT_REST=false?)")
    nonce = raw[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, raw[len(MAGIC) + NONCE_BYTES:], MAGIC)
    except InvalidTag:
        raise SealError("blob failed authentication: wrong data key, or its bytes were changed") from None


def data_key(settings) -> bytes | None:
    """The data key for `settings` (None when encryption at rest is off), checked against the store."""
    if not settings.encrypt_at_rest:
        return None
    if settings.secret_key:
        try:
            key = base64.b64decode(settings.secret_key.get_secret_value(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ValueError(f"ATELIER_SECRET_KEY must be the base64 of {KEY_BYTES} random bytes "
                             f"(e.g. `python -c \"import os,base64;print(base64.b64encode(os.urandom(32)).decode())\"`)")
    else:
        key = create_secret_once(settings.secret_key_file or settings.home_dir / KEY_FILE)
    check = settings.blobs_dir / CHECK_FILE
    if check.exists():
        try:
            unseal(key, check.read_bytes())
        except SealError:
            raise ValueError(f"the data key does not open {settings.blobs_dir}: it was sealed with another key "
                             "(check ATELIER_SECRET_KEY / ATELIER_SECRET_KEY_FILE)") from None
    else:
        from atelier.common.files import atomic_write_bytes

        atomic_write_bytes(check, seal(key, CANARY))
    return key


__all__ = ["seal", "unseal", "is_sealed", "data_key", "create_secret_once", "SealError", "MAGIC"]


def audit_mac_key(settings) -> bytes:
    """The audit chain's MAC key: derived from the data key, or (encryption off) from its own file."""
    from atelier.safety.audit import audit_key

    data = data_key(settings)
    return audit_key(data if data is not None else create_secret_once(settings.home_dir / "audit.key"))
