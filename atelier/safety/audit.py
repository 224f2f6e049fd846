"""A tamper-evident audit log: each entry's hash covers its content and the previous hash.

Editing or deleting any past entry breaks every hash after it; `verify` finds the first
broken link. This is the hash; the log itself is atelier/storage/audit.py.
"""

from __future__ import annotations

import hashlib
import json

GENESIS = "0" * 64


def chain_digest(prev_hash: str, at, key_id, action, target, detail) -> str:
    body = json.dumps([prev_hash, at.isoformat(), key_id, action, target, detail],
                      ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
