"""API keys in the database: create (the secret is returned once), find by secret, revoke; and the
server's memory of the keys it has just seen (KeyCache).

Only each secret's SHA-256 is stored (atelier/safety/keys.py says why that is enough).
"""

from __future__ import annotations

import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from atelier.safety.keys import KEY_PREFIX, hash_secret, validate_scopes
from atelier.safety.redact import redact
from atelier.storage.db import ApiKey, utcnow
from atelier.storage.remembered import Remembered
from atelier.storage.usage import check_limits


MODERATION_POLICIES = ("off", "flag", "block")


def create_key(db: Session, *, name: str = "", scopes: list[str], secret: str | None = None,
               limits: dict | None = None, moderation: str | None = None) -> tuple[ApiKey, str]:
    """Store a new key and return it with its secret (the only time the secret is seen); `limits` are its
    rate limits and quotas (atelier/storage/usage.py), `moderation` its own policy (None: the server's)."""
    if moderation not in (None, *MODERATION_POLICIES):
        raise ValueError(f"moderation {moderation!r} is not one of {', '.join(MODERATION_POLICIES)}")
    scopes = validate_scopes(scopes)
    limits = check_limits(limits or {})
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    if len(secret) < 16:
        raise ValueError("a key must be at least 16 characters long")
    key = ApiKey(id="key_" + secrets.token_hex(8), name=redact(name).text, prefix=secret[:8], hash=hash_secret(secret),
                 scopes=scopes, limits=limits or None, moderation=moderation)
    db.add(key)
    db.commit()
    return key, secret


_KEY_BY_HASH = select(ApiKey).where(ApiKey.hash == bindparam("hash"))  # every request's: built once


def find_key(db: Session, *, secret: str) -> ApiKey | None:
    """The active key with this secret, or None (unknown or revoked)."""
    key = db.scalar(_KEY_BY_HASH, {"hash": hash_secret(secret)})
    if key is None or key.revoked_at is not None:
        return None
    return key


class KeyCache:
    """Active keys by secret, remembered for a moment (atelier/storage/remembered.py): every request names
    its key. What it hands out are keys of no session, which a request merges into its own."""

    def __init__(self, sessions: sessionmaker, ttl_s: float):
        self._sessions = sessions
        self.remembered = Remembered(sessions, (ApiKey,), ttl_s)

    def find(self, secret: str) -> ApiKey | None:
        """The active key with this secret, or None (unknown or revoked)."""
        def read() -> ApiKey | None:
            with self._sessions() as db:  # closing it leaves the key loaded and in no session
                return find_key(db, secret=secret)

        return self.remembered.get(hash_secret(secret), read)


def list_keys(db: Session) -> list[ApiKey]:
    return list(db.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(db: Session, *, key_id: str) -> ApiKey:
    key = db.get(ApiKey, key_id)
    if key is None:
        raise LookupError(f"key {key_id!r} does not exist")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.commit()
    return key


def count_active_admin_keys(db: Session) -> int:
    return sum(1 for k in list_keys(db) if k.revoked_at is None and "admin" in k.scopes)
