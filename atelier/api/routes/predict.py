"""POST /api/models/{model}/predict: rows in, predictions out, for tabular (sklearn) models."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import GenerateKey, SessionDep
from atelier.api.errors import APIError, bad_request
from atelier.api.models_lookup import resolve_version
from atelier.models import tabular
from atelier.storage.db import Version
from atelier.storage.registry import version_folder

router = APIRouter(prefix="/api", tags=["predict"])

MAX_ROWS = 1000
CACHE_SIZE = 8  # loaded models kept per process; the oldest goes first
_cache_lock = threading.Lock()


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ROWS)


def load_tabular(request: Request, version: Version) -> tabular.TabularModel:
    """The version's TabularModel, from app.state's small cache or loaded (skops, trusted types only)."""
    state = request.app.state
    with _cache_lock:
        cache = getattr(state, "tabular_models", None)
        if cache is None:
            cache = state.tabular_models = {}
    key = (version.model.name, version.number, version.files.get(tabular.MODEL_FILE))
    if key in cache:
        return cache[key]
    try:
        folder = version_folder(state.blobs, version, state.settings.home_dir / "versions")
        model = tabular.load(folder)
    except (OSError, ValueError) as e:
        raise APIError(503, f"model {version.model.name}@{version.number} could not be loaded: {e}",
                       type="server_error", code="model_load_failed") from None
    with _cache_lock:
        while len(cache) >= CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = model
    return model


@router.post("/models/{model}/predict")
def predict(model: str, body: PredictRequest, request: Request, db: SessionDep, key: GenerateKey):
    """Predict a value (regression) or a class with its probabilities (classification) for each row."""
    version = resolve_version(db, model)
    if version.model.family != tabular.FAMILY:
        raise bad_request(f"model {version.model.name!r} is a {version.model.family} model ({version.model.task}); "
                          f"only {tabular.FAMILY} models predict rows", "model", code="model_not_supported")
    loaded = load_tabular(request, version)
    try:
        out = {"model": f"{version.model.name}@{version.number}", "predictions": loaded.predict(body.rows)}
        if loaded.config.task == "classification":
            out["probabilities"] = loaded.predict_proba(body.rows)
    except ValueError as e:
        raise bad_request(str(e), "rows") from None
    return out
