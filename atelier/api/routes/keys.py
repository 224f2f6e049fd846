"""Admin: create, list and revoke API keys (the secret is returned once, at creation)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import AdminKey, SessionDep
from atelier.api.errors import APIError, bad_request, not_found
from atelier.storage.db import ApiKey
from atelier.storage import audit
from atelier.storage.keys import count_active_admin_keys, create_key, list_keys, revoke_key
from atelier.storage.usage import check_limits

router = APIRouter(prefix="/api/keys", tags=["keys"])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=128)
    scopes: list[str] = Field(default_factory=lambda: ["generate"], min_length=1)
    limits: dict[str, int | None] = Field(default_factory=dict)  # rpm, tpm, images_per_day, max_parallel, …
    moderation: Literal["off", "flag", "block"] | None = None  # this key's policy; null: ATELIER_MODERATION


class KeyUpdate(BaseModel):
    """What is given changes; what is left out stays."""

    model_config = ConfigDict(extra="forbid")

    limits: dict[str, int | None] | None = None  # replaces the key's limits; null removes one
    moderation: Literal["off", "flag", "block"] | None = None  # null: back to ATELIER_MODERATION


def key_public(k: ApiKey) -> dict:
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes, "limits": k.limits or {},
            "moderation": k.moderation,
            "created_at": k.created_at.isoformat() + "Z",
            "revoked_at": k.revoked_at.isoformat() + "Z" if k.revoked_at else None}


@router.post("", status_code=201)
def create(body: KeyCreate, db: SessionDep, key: AdminKey):
    """Create a key; the response carries its secret, which is never shown again."""
    try:
        check_limits(body.limits)
    except ValueError as e:
        raise bad_request(str(e), "limits") from None
    try:
        new, secret = create_key(db, name=body.name, scopes=body.scopes, limits=body.limits,
                                 moderation=body.moderation)
    except ValueError as e:
        raise bad_request(str(e), "scopes") from None
    audit.record(db, action="key.create", target=new.id, key_id=key.id,
                 detail={"scopes": new.scopes, "limits": new.limits or {}, "moderation": new.moderation})
    return key_public(new) | {"key": secret}


@router.get("")
def list_all(db: SessionDep, key: AdminKey):
    """Every key, revoked ones included (no secrets: only prefixes)."""
    return {"object": "list", "data": [key_public(k) for k in list_keys(db)]}


@router.patch("/{key_id}")
def update(key_id: str, body: KeyUpdate, db: SessionDep, key: AdminKey):
    """Change a key's rate limits and quotas, or its moderation policy (from its next request)."""
    target = db.get(ApiKey, key_id)
    if target is None:
        raise not_found(f"key {key_id!r} does not exist", "key_id")
    if not body.model_fields_set:
        raise bad_request("give limits and/or moderation to change", "limits")
    if "limits" in body.model_fields_set:
        try:
            target.limits = check_limits(body.limits or {}) or None
        except ValueError as e:
            raise bad_request(str(e), "limits") from None
    if "moderation" in body.model_fields_set:
        target.moderation = body.moderation
    db.commit()
    audit.record(db, action="key.update", target=key_id, key_id=key.id,
                 detail={"limits": target.limits or {}, "moderation": target.moderation})
    return key_public(target)


@router.delete("/{key_id}")
def revoke(key_id: str, db: SessionDep, key: AdminKey):
    """Revoke a key at once; refuses to revoke the last active admin key."""
    target = db.get(ApiKey, key_id)
    if target is None:
        raise not_found(f"key {key_id!r} does not exist", "key_id")
    if target.revoked_at is None and "admin" in target.scopes and count_active_admin_keys(db) <= 1:
        raise APIError(409, "refusing to revoke the last active admin key; create another admin key first",
                       param="key_id", code="last_admin_key")
    revoked = revoke_key(db, key_id=key_id)
    audit.record(db, action="key.revoke", target=key_id, key_id=key.id)
    return key_public(revoked) | {"deleted": True}
