"""GET /v1/models and /v1/models/{id}: every model, its versions and aliases."""

from __future__ import annotations

from fastapi import APIRouter

from atelier.api.deps import ReadKey, SessionDep
from atelier.api.models_lookup import resolve_version
from atelier.api.models_public import callable_ids, model_public
from atelier.storage.ownership import can_see_model
from atelier.storage.registry import list_models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_all(db: SessionDep, key: ReadKey):
    """All models by the ids a caller can use (fine-tunes as `name:ft-suffix` too), in OpenAI's list shape
    with Atelier's versions and aliases added."""
    return {"object": "list", "data": [entry for m in list_models(db) if can_see_model(key, m)
                                       for entry in callable_ids(m, key)]}


@router.get("/models/{model_id:path}")
def retrieve(model_id: str, db: SessionDep, key: ReadKey):
    """One model; `name:alias` and `name@version` resolve to that version."""
    v = resolve_version(db, model_id, param="model_id", key=key)
    out = model_public(v.model, current=v, key=key)
    return out | {"id": model_id}
