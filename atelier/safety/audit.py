"""A tamper-evident audit log: each entry's hash covers its content and the previous hash.

Editing or deleting any past entry breaks every hash after it; `verify` finds the first
broken link.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from atelier.registry.db import AuditEntry, utcnow

GENESIS = "0" * 64


def _digest(prev_hash: str, at, key_id, action, target, detail) -> str:
    body = json.dumps([prev_hash, at.isoformat(), key_id, action, target, detail],
                      ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def record(db: Session, *, action: str, target: str = "", key_id: str | None = None,
           detail: dict | None = None, commit: bool = True) -> AuditEntry:
    last = db.scalar(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1))
    prev = last.hash if last else GENESIS
    at = utcnow()
    detail = detail or {}
    entry = AuditEntry(at=at, key_id=key_id, action=action, target=target, detail=detail, prev_hash=prev,
                       hash=_digest(prev, at, key_id, action, target, detail))
    db.add(entry)
    if commit:
        db.commit()
    return entry


def verify(db: Session) -> dict:
    """{"ok": bool, "entries": n, "first_bad_id": id | None}."""
    prev = GENESIS
    n = 0
    for e in db.scalars(select(AuditEntry).order_by(AuditEntry.id)):
        n += 1
        if e.prev_hash != prev or e.hash != _digest(prev, e.at, e.key_id, e.action, e.target, e.detail):
            return {"ok": False, "entries": n, "first_bad_id": e.id}
        prev = e.hash
    return {"ok": True, "entries": n, "first_bad_id": None}
