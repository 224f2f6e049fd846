"""The audit log in the database: append an entry to the hash chain, verify the chain."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from atelier.safety.audit import GENESIS, chain_digest
from atelier.safety.redact import redact, redact_obj
from atelier.storage.db import AuditEntry, utcnow


def record(db: Session, *, action: str, target: str = "", key_id: str | None = None,
           detail: dict | None = None, commit: bool = True) -> AuditEntry:
    last = db.scalar(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1))
    prev = last.hash if last else GENESIS
    at = utcnow()
    detail, target = redact_obj(detail or {}), redact(target).text  # no personal data in the log
    entry = AuditEntry(at=at, key_id=key_id, action=action, target=target, detail=detail, prev_hash=prev,
                       hash=chain_digest(prev, at, key_id, action, target, detail))
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
        if e.prev_hash != prev or e.hash != chain_digest(prev, e.at, e.key_id, e.action, e.target, e.detail):
            return {"ok": False, "entries": n, "first_bad_id": e.id}
        prev = e.hash
    return {"ok": True, "entries": n, "first_bad_id": None}
