"""Admin: read the audit log and verify its hash chain."""

from __future__ import annotations

from fastapi import APIRouter, Query
from sqlalchemy import select

from atelier.api.deps import AdminKey, WrittenSessionDep
from atelier.storage.db import AuditEntry
from atelier.storage import audit

router = APIRouter(prefix="/api/audit", tags=["audit"])


@router.get("")
def list_entries(db: WrittenSessionDep, key: AdminKey, limit: int = Query(50, ge=1, le=500), after: int = Query(0, ge=0, le=2**63 - 1)):
    """Entries in order, `limit` at a time after id `after`."""
    rows = db.scalars(select(AuditEntry).where(AuditEntry.id > after).order_by(AuditEntry.id).limit(limit))
    data = [{"id": e.id, "at": e.at.isoformat() + "Z", "key_id": e.key_id, "action": e.action, "target": e.target,
             "detail": e.detail, "hash": e.hash} for e in rows]
    return {"object": "list", "data": data, "has_more": len(data) == limit}


@router.get("/verify")
def verify(db: WrittenSessionDep, key: AdminKey):
    """Recompute the hash chain; `ok` is false and `first_bad_id` names the first broken entry."""
    return audit.verify(db)
