"""POST /api/models/{model}/predict: rows in, predictions out, for tabular (sklearn) models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import GenerateKey, ManagerDep, SessionDep
from atelier.api.errors import bad_request
from atelier.api.models_lookup import acquire

router = APIRouter(prefix="/api", tags=["predict"])

MAX_ROWS = 1000


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ROWS)
    keep_alive: str | float | None = None


def _predict(loaded, rows: list[dict]) -> dict:
    with loaded.lock:  # one call at a time per model: estimators are not promised thread-safe
        out = {"model": loaded.ref, "predictions": loaded.servable.predict(rows)}
        if loaded.task == "classification":
            out["probabilities"] = loaded.servable.predict_proba(rows)
    return out


@router.post("/models/{model}/predict")
async def predict(model: str, body: PredictRequest, db: SessionDep, manager: ManagerDep, key: GenerateKey):
    """Predict a value (regression) or a class with its probabilities (classification) for each row."""
    loaded = acquire(manager, db, model, tasks=("classification", "regression"), keep_alive=body.keep_alive)
    try:
        return await run_in_threadpool(_predict, loaded, body.rows)
    except ValueError as e:
        raise bad_request(str(e), "rows") from None
    finally:
        manager.release(loaded, body.keep_alive)
