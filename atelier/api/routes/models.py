"""GET /v1/models and /v1/models/{id}: every model, its versions and aliases."""

from __future__ import annotations

import calendar

from fastapi import APIRouter

from atelier.api.deps import ReadKey, SessionDep
from atelier.api.models_lookup import resolve_version
from atelier.storage.db import Model, Version
from atelier.storage.registry import list_models
from atelier.runtime.image_engine import IMAGE_FAMILIES, image_sizes, upscalers

router = APIRouter(prefix="/v1", tags=["models"])


def _ts(dt) -> int:
    return calendar.timegm(dt.timetuple())


def version_public(v: Version) -> dict:
    cfg = v.config.get("atelier_config", v.config)
    return {"version": v.number, "ref": f"{v.model.name}@{v.number}", "created": _ts(v.created_at),
            "size_bytes": v.size_bytes, "metrics": v.metrics, "context_length": cfg.get("n_positions"),
            "files": v.files}


def model_public(m: Model, current: Version | None = None) -> dict:
    latest = current or next((v for v in m.versions for a in m.aliases
                              if a.name == "latest" and a.version_number == v.number), None)
    return {"id": m.name, "object": "model", "created": _ts(m.created_at), "owned_by": m.owner,
            "family": m.family, "task": m.task,
            "aliases": {a.name: a.version_number for a in sorted(m.aliases, key=lambda a: a.name)},
            "versions": [version_public(v) for v in m.versions],
            "latest": version_public(latest) if latest else None} | _image_fields(m, latest)


def _image_fields(m: Model, v: Version | None) -> dict:
    """Image models list the sizes they serve (`size` must be one of them) and how they enlarge."""
    if m.family not in IMAGE_FAMILIES or v is None:
        return {}
    return {"image_sizes": image_sizes(v.config), "upscalers": upscalers(v.files)}


@router.get("/models")
def list_all(db: SessionDep, key: ReadKey):
    """All models (OpenAI's list shape, with Atelier's versions and aliases added)."""
    return {"object": "list", "data": [model_public(m) for m in list_models(db)]}


@router.get("/models/{model_id:path}")
def retrieve(model_id: str, db: SessionDep, key: ReadKey):
    """One model; `name:alias` and `name@version` resolve to that version."""
    v = resolve_version(db, model_id, param="model_id")
    out = model_public(v.model, current=v)
    return out | {"id": model_id}
