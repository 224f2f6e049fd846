"""API keys: random secrets shown once, stored only as SHA-256 hashes.

A key has scopes: `admin` (everything), `generate` (completions, chat, poems), `train`
(files, fine-tuning) and `read` (list models, read the gallery). Every scope implies
`read`. Keys are 256-bit random tokens, so an unsalted SHA-256 is a safe verifier (the
same scheme GitHub and Stripe use for tokens): there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from atelier.registry.db import ApiKey, utcnow

SCOPES = ("admin", "generate", "train", "read")
KEY_PREFIX = "atl-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def has_scope(key: ApiKey, scope: str) -> bool:
    return "admin" in key.scopes or scope in key.scopes or scope == "read"


def validate_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes {bad or scopes!r} are not valid; choose from {', '.join(SCOPES)}")
    return sorted(set(scopes), key=SCOPES.index)


def create_key(db: Session, *, name: str = "", scopes: list[str], secret: str | None = None) -> tuple[ApiKey, str]:
    """Store a new key and return it with its secret (the only time the secret is seen)."""
    scopes = validate_scopes(scopes)
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    if len(secret) < 16:
        raise ValueError("a key must be at least 16 characters long")
    key = ApiKey(id="key_" + secrets.token_hex(8), name=name, prefix=secret[:8], hash=hash_secret(secret),
                 scopes=scopes)
    db.add(key)
    db.commit()
    return key, secret


def find_key(db: Session, *, secret: str) -> ApiKey | None:
    """The active key with this secret, or None (unknown or revoked)."""
    key = db.scalar(select(ApiKey).where(ApiKey.hash == hash_secret(secret)))
    if key is None or key.revoked_at is not None:
        return None
    return key


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
