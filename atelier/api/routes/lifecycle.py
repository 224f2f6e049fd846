"""Model lifecycle: promote (move an alias), roll back, quantize, delete, export and import archives."""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import AdminKey, BlobsDep, ManagerDep, SessionDep, SettingsDep, TrainKey
from atelier.api.errors import APIError, bad_request, not_found
from atelier.api.models_lookup import resolve_version
from atelier.api.security_headers import content_disposition
from atelier.api.uploads import read_limited
from atelier.api.models_public import model_public
from atelier.families import FAMILIES, imports
from atelier.storage import archives
from atelier.storage.ownership import can_change_model, can_see_model, owner_for
from atelier.storage import registry as store
from atelier.storage import audit
from atelier.training import compress

router = APIRouter(prefix="/api/models", tags=["lifecycle"])


class AliasMove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(min_length=1, max_length=32)
    version: int = Field(ge=1, le=2**63 - 1)


class Quantize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["int8"] = "int8"
    alias: str = Field(default="int8", min_length=1, max_length=32)


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(default="production", min_length=1, max_length=32)


def _model(db, name: str, key):
    """A model `key` may change: 404 if it cannot see it, 403 if it sees it but is not its owner."""
    try:
        model = store.get_model(db, name=name)
    except store.NotFound as e:
        raise not_found(str(e), "model", code="model_not_found") from None
    if not can_see_model(key, model):
        raise not_found(f"model {name!r} does not exist", "model", code="model_not_found")
    if not can_change_model(key, model):
        raise APIError(403, f"model {name!r} belongs to another key; only its owner or an admin moves its aliases",
                       type="permission_error", param="model", code="not_owner")
    return model


@router.post("/{name}/aliases")
def promote(name: str, body: AliasMove, db: SessionDep, key: TrainKey):
    """Point an alias (e.g. production) at a version."""
    model = _model(db, name, key)
    try:
        store.set_alias(db, model=model, alias=body.alias, number=body.version)
    except store.NotFound as e:
        raise not_found(str(e), "version") from None
    except ValueError as e:
        raise bad_request(str(e), "alias") from None
    db.commit()
    audit.record(db, action="model.promote", target=f"{name}@{body.version}", key_id=key.id,
                 detail={"alias": body.alias})
    return model_public(model, key=key)


@router.post("/{name}/rollback")
def rollback(name: str, body: Rollback, db: SessionDep, key: TrainKey):
    """Move an alias back to the version before the one it points at."""
    _model(db, name, key)
    try:
        number = store.rollback(db, name=name, alias=body.alias)
    except store.NotFound as e:
        raise not_found(str(e), "alias") from None
    except store.Conflict as e:
        raise APIError(409, str(e), param="alias", code="nothing_to_roll_back") from None
    audit.record(db, action="model.rollback", target=f"{name}@{number}", key_id=key.id, detail={"alias": body.alias})
    return model_public(_model(db, name, key), key=key)


@router.post("/{ref:path}/quantize")
def quantize(ref: str, body: Quantize, db: SessionDep, blobs: BlobsDep, settings: SettingsDep,
             manager: ManagerDep, key: TrainKey):
    """A new version of the model with int8 weights (a quarter of the bytes), under `alias`; the source
    version is untouched. Only families whose weights are float matrices say yes (chargpt, abc-gpt)."""
    version = resolve_version(db, ref, key=key)
    model = _model(db, version.model.name, key)
    family = FAMILIES[model.family]
    if not family.quantizable:
        quantizable = ", ".join(n for n, f in FAMILIES.items() if f.quantizable)
        raise bad_request(f"model {model.name!r} ({model.family}) cannot be quantized; quantizable families: "
                          f"{quantizable}", "model", code="model_not_supported")
    source = f"{model.name}@{version.number}"
    with tempfile.TemporaryDirectory(dir=settings.home_dir) as tmp:
        folder = store.version_folder(blobs, version, Path(tmp) / "source")
        try:
            entry = compress.quantize_folder(folder, Path(tmp) / "quantized", body.method)
        except ValueError as e:
            raise bad_request(str(e), "model", code="already_quantized") from None
        finally:  # an encrypted store unpacked it in memory: gone once read, unless the runtime holds it
            if blobs.encrypted and manager.get_loaded(model.name, version.number) is None:
                shutil.rmtree(folder, ignore_errors=True)
        new = store.register_version(db, blobs, name=model.name, family=model.family, task=model.task,
                                     folder=Path(tmp) / "quantized", metrics=dict(version.metrics),
                                     training={"lineage": {"quantized_from": source, **entry}}, aliases=())
        try:
            store.set_alias(db, model=model, alias=body.alias, number=new.number)
        except ValueError as e:
            raise bad_request(str(e), "alias") from None
        db.commit()
    target = f"{model.name}@{new.number}"
    audit.record(db, action="model.quantize", target=target, key_id=key.id,
                 detail={"from": source, "method": body.method, "alias": body.alias})
    return {"id": target, "object": "model.version", "quantized_from": source, "alias": body.alias,
            "method": body.method, "size_bytes": new.size_bytes, "source_size_bytes": version.size_bytes}


@router.delete("/{ref:path}")
def delete(ref: str, db: SessionDep, key: AdminKey, force: bool = Query(False)):
    """Delete a version (`name@N`); refused while an alias points at it unless force=true."""
    if "@" not in ref:
        raise bad_request("name a version to delete, as name@N", "model")
    version = resolve_version(db, ref, key=key)
    try:
        removed = store.delete_version(db, version=version, force=force)
    except store.Conflict as e:
        raise APIError(409, str(e), param="model", code="version_has_aliases") from None
    audit.record(db, action="model.delete", target=ref, key_id=key.id, detail={"removed_aliases": removed})
    return {"id": ref, "object": "model.version", "deleted": True, "removed_aliases": removed}


@router.get("/{ref:path}/export")
def export(ref: str, db: SessionDep, blobs: BlobsDep, key: TrainKey):
    """The version as one zip archive (files + manifest with sha256)."""
    version = resolve_version(db, ref, key=key)
    data = archives.export_archive(blobs, version)
    audit.record(db, action="model.export", target=f"{version.model.name}@{version.number}", key_id=key.id)
    filename = f"{version.model.name}-{version.number}.zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": content_disposition(filename)})


@router.post("/import")
async def import_(db: SessionDep, settings: SettingsDep, blobs: BlobsDep, key: TrainKey, file: UploadFile,
                  name: str | None = Form(None)):
    """Register a model: an archive from `export`, or a model you bring — a .zip of a transformers causal LM or
    diffusers pipeline folder, or an .onnx file (atelier.json beside it optional). Checked by loading it first."""
    data = await read_limited(file, settings.max_upload_bytes)
    if is_atelier_archive(data):
        if name is not None:
            check_name_free(db, name, key)
        try:
            version = archives.import_archive(db, blobs, data, name=name, max_unpacked=settings.max_upload_bytes * 4,
                                              owner=owner_for(key), may_add_to=lambda m: can_change_model(key, m))
        except store.Conflict as e:
            db.rollback()
            raise APIError(409, str(e), param="name", code="name_taken") from None
        except (ValueError, KeyError) as e:
            db.rollback()
            raise bad_request(f"{e}", "file", code="invalid_archive") from None
        audit.record(db, action="model.import", target=f"{version.model.name}@{version.number}", key_id=key.id)
        return model_public(version.model, current=version, key=key)
    name = name or default_name(file.filename)
    check_name_free(db, name, key)
    with tempfile.TemporaryDirectory(prefix="atelier-import-") as tmp:
        try:
            folder = imports.unpack(data, file.filename or "", Path(tmp), max_unpacked=settings.max_upload_bytes * 4)
            version = await run_in_threadpool(imports.import_folder, db, blobs, folder, name=name, key_id=key.id,
                                              owner=owner_for(key), source=file.filename or "upload")
        except imports.ImportRefused as e:
            raise bad_request(str(e), e.param, code="invalid_model") from None
    return model_public(version.model, current=version, key=key)


def check_name_free(db, name: str, key) -> None:
    """A new version of an existing model only from its owner (or an admin): another key's model —
    or a shared one, for a non-admin key — is not imported over."""
    try:
        model = store.get_model(db, name=name)
    except store.NotFound:
        return
    if not can_change_model(key, model):
        raise APIError(409, f"the name {name!r} is taken by a model this key does not own; choose another name",
                       param="name", code="name_taken")


def is_atelier_archive(data: bytes) -> bool:
    """An `atelier models export` zip: manifest.json names the atelier-model format."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return "manifest.json" in z.namelist() and \
                json.loads(z.read("manifest.json")).get("format") == archives.ARCHIVE_FORMAT
    except (zipfile.BadZipFile, ValueError, AttributeError, KeyError, RecursionError):
        return False


def default_name(filename: str | None) -> str:
    """my-Model_v2.onnx → my-model_v2 (a name is required when the file name gives none)."""
    stem = Path(filename or "").name.removesuffix(".zip").removesuffix(".onnx").lower()
    stem = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")
    if not stem:
        raise bad_request("name the model: the form field `name` is required", "name")
    return stem[:64]
