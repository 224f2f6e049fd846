"""A tamper-evident audit log: each entry's MAC covers its content and the previous entry's MAC.

The MAC is HMAC-SHA256 under a key derived from the data key (`audit_key`), so nobody with only
write access to the database can rebuild the chain after editing it. A signed *head* (the last
entry's id and MAC, and the number of entries) catches what a chain alone cannot: deleting the
last entries. Editing or deleting any entry breaks the chain or the head; `verify` names the first
bad entry. This is the cryptography; the log itself is atelier/storage/audit.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json

GENESIS = "0" * 64


def chain_digest(prev_hash: str, at, key_id, action, target, detail, mac_key: bytes | None = None) -> str:
    """One entry's MAC (or, for entries written before the chain was keyed, its plain SHA-256)."""
    body = json.dumps([prev_hash, at.isoformat(), key_id, action, target, detail],
                      ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if mac_key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(mac_key, body, hashlib.sha256).hexdigest()


def head_mac(mac_key: bytes, last_id: int, last_hash: str, entries: int, keyed_from: int) -> str:
    """The signature of the chain's head."""
    return hmac.new(mac_key, f"{last_id}:{last_hash}:{entries}:{keyed_from}".encode(), hashlib.sha256).hexdigest()


def audit_key(data_key: bytes) -> bytes:
    """The chain's MAC key, derived from the data key (never the data key itself)."""
    return hmac.new(data_key, b"atelier audit chain v1", hashlib.sha256).digest()
