"""GET /api/usage: requests, tokens and images per key, model and day (a key its own; an admin any key's)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Query

from atelier.api.deps import ReadKey, WrittenSessionDep
from atelier.api.errors import APIError
from atelier.storage.db import utcnow
from atelier.storage.ownership import is_admin
from atelier.storage.usage import summary

router = APIRouter(prefix="/api/usage", tags=["usage"])


@router.get("")
def usage(db: WrittenSessionDep, key: ReadKey, days: int = Query(30, ge=1, le=366), key_id: str | None = None):
    """Usage over the last `days` days; `key_id` (admins) picks another key, `all` every key."""
    if key_id not in (None, key.id) and not is_admin(key):
        raise APIError(403, "only an admin key reads another key's usage", type="permission_error",
                       param="key_id", code="insufficient_scope")
    who = None if key_id == "all" else (key_id or key.id)
    rows = summary(db, who, utcnow() - timedelta(days=days))
    totals = {"requests": sum(r["requests"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
              "images": sum(r["images"] for r in rows)}
    return {"object": "list", "data": rows, "totals": totals, "limits": (key.limits or {}) if who == key.id else None}
