"""POST /api/models/{model}/predict: rows or tensors in, predictions out (sklearn tables, ONNX models).

A request gives exactly one of
  rows    [{column: value}, …]           every table model (sklearn, onnx over a table)
  inputs  {"<graph input>": nested list}  models that run on named tensors (onnx)
  images  ["<base64 PNG/JPEG/WebP>", …]   models whose manifest says how they take pictures (onnx)
and may ask `explain: true` (rows only) for each feature's contribution per row.

What the route asks of a "call" servable (the family's model object), by duck typing:
  run(rows=…, inputs=…, images=…) → {"outputs": …, "predictions"?: …, "probabilities"?: …}   (onnx)
  or predict(rows) → predictions, and predict_proba(rows) for classification      (sklearn)
  explain(rows) → {"method": str, "explanations": [{"base", "contributions"}, …]}
  cannot_explain → None, or why explain cannot work for this version (a 400 naming `explain`)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from atelier.api.deps import GenerateKey, ManagerDep, SessionDep, SettingsDep
from atelier.api.errors import bad_request
from atelier.api.metering import Meter, metered
from atelier.api.models_lookup import acquire
from atelier.api.uploads import open_base64_image

router = APIRouter(prefix="/api", tags=["predict"])

MAX_ROWS = 1000
MAX_INPUT_VALUES = 1_000_000  # numbers (or strings) in all of a request's `inputs` together
MAX_IMAGES = 64
TASKS = ("classification", "regression", "inference", "image-tagging")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=MAX_ROWS)
    inputs: dict[str, Any] | None = None
    images: list[str] | None = Field(default=None, min_length=1, max_length=MAX_IMAGES)
    explain: bool = False
    keep_alive: str | float | None = None


def count_values(inputs: dict) -> int:
    """The leaves of every nested list in `inputs`, counted without recursion (no depth limit to hit)."""
    n, stack = 0, list(inputs.values())
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            n += 1
    return n


def check_request(body: PredictRequest, settings) -> list | None:
    """400s naming the field, before any model is loaded; the decoded images, if any."""
    given = [name for name in ("rows", "inputs", "images") if getattr(body, name) is not None]
    if len(given) != 1:
        raise bad_request("give exactly one of rows (a list of objects, one per row), inputs "
                          "({input name: nested list}) or images (base64 pictures)", given[-1] if given else "rows")
    if body.images is not None:
        if body.explain:
            raise bad_request("explain works on rows (a table), not on images", "explain")
        return [decode_image(data, i, settings) for i, data in enumerate(body.images)]
    if body.inputs is not None:
        if not body.inputs:
            raise bad_request("inputs must name at least one input: {input name: nested list}", "inputs")
        n = count_values(body.inputs)
        if n > MAX_INPUT_VALUES:
            raise bad_request(f"inputs hold {n} values; at most {MAX_INPUT_VALUES} are accepted per request "
                              "(send smaller batches)", "inputs")
        if body.explain:
            raise bad_request("explain works on rows (a table), not on inputs", "explain")
    return None


def decode_image(data: str, index: int, settings):
    """One base64 picture → an RGB image, within the upload limits (decompression bombs refused)."""
    return open_base64_image(data, settings, param="images", label=f"images[{index}]")[0]


def _predict(loaded, body: PredictRequest, images: list | None) -> dict:
    servable = loaded.servable
    run = getattr(servable, "run", None)
    for name in ("inputs", "images"):
        if getattr(body, name) is not None and run is None:
            raise bad_request(f"model {loaded.ref} (a {loaded.family.name} model) takes rows, not {name}", name)
    if body.explain:
        why = getattr(servable, "cannot_explain", f"{loaded.family.name} models do not explain their predictions")
        if why or not hasattr(servable, "explain"):
            raise bad_request(f"model {loaded.ref} cannot explain: "
                              f"{why or 'its family has no explanations'}", "explain")
    param = "rows" if body.rows is not None else "inputs" if body.inputs is not None else "images"
    try:
        with loaded.lock:  # one call at a time per model: estimators and sessions are not promised thread-safe
            if run is not None:
                out = {"model": loaded.ref} | (run(images=images) if images is not None else
                                               run(rows=body.rows, inputs=body.inputs))
            else:
                out = {"model": loaded.ref, "predictions": servable.predict(body.rows)}
                if loaded.task == "classification":
                    out["probabilities"] = servable.predict_proba(body.rows)
            if body.explain:
                explained = servable.explain(body.rows)
                out["explanations"] = explained["explanations"]
                out["explain_method"] = explained["method"]
    except ValueError as e:
        raise bad_request(str(e), param) from None
    return out


@router.post("/models/{model}/predict")
async def predict(model: str, body: PredictRequest, db: SessionDep, settings: SettingsDep, manager: ManagerDep,
                  key: GenerateKey, meter: Meter = Depends(metered("predict"))):
    """Predict from rows (a table), named tensors (inputs) or pictures (images); explain=true adds per-feature
    contributions."""
    images = check_request(body, settings)
    loaded = await acquire(manager, db, model, key=key, tasks=TASKS, keep_alive=body.keep_alive)
    meter.model = loaded.ref
    try:
        return await run_in_threadpool(_predict, loaded, body, images)
    finally:
        manager.release(loaded, body.keep_alive)
