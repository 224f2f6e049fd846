"""Model lifecycle: promote (move an alias), roll back, delete, export and import archives."""

from __future__ import annotations

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from atelier.api.deps import AdminKey, SessionDep, SettingsDep, TrainKey
from atelier.api.errors import APIError, bad_request, not_found
from atelier.api.models_lookup import resolve_version
from atelier.api.uploads import read_limited
from atelier.api.models_public import model_public
from atelier.storage import archives
from atelier.storage import registry as store
from atelier.storage import audit

router = APIRouter(prefix="/api/models", tags=["lifecycle"])


class AliasMove(BaseModel):
    alias: str = Field(min_length=1, max_length=32)
    version: int = Field(ge=1)


class Rollback(BaseModel):
    alias: str = Field(default="production", min_length=1, max_length=32)


def _model(db, name: str):
    try:
        return store.get_model(db, name=name)
    except store.NotFound as e:
        raise not_found(str(e), "model", code="model_not_found") from None


@router.post("/{name}/aliases")
def promote(name: str, body: AliasMove, db: SessionDep, key: TrainKey):
    """Point an alias (e.g. production) at a version."""
    model = _model(db, name)
    try:
        store.set_alias(db, model=model, alias=body.alias, number=body.version)
    except store.NotFound as e:
        raise not_found(str(e), "version") from None
    except ValueError as e:
        raise bad_request(str(e), "alias") from None
    db.commit()
    audit.record(db, action="model.promote", target=f"{name}@{body.version}", key_id=key.id,
                 detail={"alias": body.alias})
    return model_public(model)


@router.post("/{name}/rollback")
def rollback(name: str, body: Rollback, db: SessionDep, key: TrainKey):
    """Move an alias back to the version before the one it points at."""
    _model(db, name)
    try:
        number = store.rollback(db, name=name, alias=body.alias)
    except store.NotFound as e:
        raise not_found(str(e), "alias") from None
    except store.Conflict as e:
        raise APIError(409, str(e), param="alias", code="nothing_to_roll_back") from None
    audit.record(db, action="model.rollback", target=f"{name}@{number}", key_id=key.id, detail={"alias": body.alias})
    return model_public(_model(db, name))


@router.delete("/{ref:path}")
def delete(ref: str, db: SessionDep, key: AdminKey, force: bool = Query(False)):
    """Delete a version (`name@N`); refused while an alias points at it unless force=true."""
    if "@" not in ref:
        raise bad_request("name a version to delete, as name@N", "model")
    version = resolve_version(db, ref)
    try:
        removed = store.delete_version(db, version=version, force=force)
    except store.Conflict as e:
        raise APIError(409, str(e), param="model", code="version_has_aliases") from None
    audit.record(db, action="model.delete", target=ref, key_id=key.id, detail={"removed_aliases": removed})
    return {"id": ref, "object": "model.version", "deleted": True, "removed_aliases": removed}


@router.get("/{ref:path}/export")
def export(ref: str, request: Request, db: SessionDep, key: TrainKey):
    """The version as one zip archive (files + manifest with sha256)."""
    version = resolve_version(db, ref)
    data = archives.export_archive(request.app.state.blobs, version)
    filename = f"{version.model.name}-{version.number}.zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.post("/import")
async def import_(request: Request, db: SessionDep, settings: SettingsDep, key: TrainKey, file: UploadFile,
                  name: str | None = Form(None)):
    """Register an exported archive as a new version (verified; safetensors/JSON only)."""
    data = await read_limited(file, settings.max_upload_bytes)
    try:
        version = archives.import_archive(db, request.app.state.blobs, data, name=name,
                                       max_unpacked=settings.max_upload_bytes * 4)
    except (ValueError, KeyError) as e:
        db.rollback()
        raise bad_request(f"{e}", "file", code="invalid_archive") from None
    audit.record(db, action="model.import", target=f"{version.model.name}@{version.number}", key_id=key.id)
    return model_public(version.model, current=version)
