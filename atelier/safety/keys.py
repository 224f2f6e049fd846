"""API keys: random secrets shown once, stored only as SHA-256 hashes.

A key has scopes: `admin` (everything), `generate` (completions, chat, poems), `train`
(files, fine-tuning) and `read` (list models, read the gallery). Every scope implies
`read`. Keys are 256-bit random tokens, so an unsalted SHA-256 is a safe verifier (the
same scheme GitHub and Stripe use for tokens): there is nothing to brute-force.
Storing and finding keys is atelier/storage/keys.py.
"""

from __future__ import annotations

import hashlib

SCOPES = ("admin", "generate", "train", "read")
KEY_PREFIX = "atl-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def has_scope(key, scope: str) -> bool:
    """Whether a key (anything with `.scopes`) may use a route that needs `scope`."""
    return "admin" in key.scopes or scope in key.scopes or scope == "read"


def validate_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes {bad or scopes!r} are not valid; choose from {', '.join(SCOPES)}")
    return sorted(set(scopes), key=SCOPES.index)
