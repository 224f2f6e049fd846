"""The runtime, as Ollama shows it: GET /api/ps (what is loaded), POST /api/models/{ref}/load|unload."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from atelier.api.deps import ManagerDep, ReadKey, SessionDep, SettingsDep, TrainKey
from atelier.api.models_lookup import acquire, check_keep_alive, resolve_version
from atelier.storage import audit

router = APIRouter(prefix="/api", tags=["runtime"])


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_alive: str | float | None = None  # default ATELIER_KEEP_ALIVE; -1 keeps it until evicted


@router.get("/ps")
def ps(manager: ManagerDep, settings: SettingsDep, key: ReadKey):
    """Loaded model versions, most recently used first, with the limits they live under."""
    return {"object": "list", "data": manager.ps(), "max_loaded_models": manager.max_loaded,
            "max_model_memory": manager.max_memory, "memory_bytes": manager.memory()}


@router.post("/models/{ref:path}/load")
async def load(ref: str, db: SessionDep, manager: ManagerDep, key: TrainKey, body: LoadRequest | None = None):
    """Load a version now (so the first request does not wait), for keep_alive once idle."""
    keep_alive = body.keep_alive if body else None
    check_keep_alive(keep_alive)
    loaded = await acquire(manager, db, ref, key=key, tasks=None, keep_alive=keep_alive)
    manager.release(loaded, keep_alive)
    audit.record(db, action="model.load", target=loaded.ref, key_id=key.id, detail={"keep_alive": keep_alive})
    return loaded.public()


@router.post("/models/{ref:path}/unload")
def unload(ref: str, db: SessionDep, manager: ManagerDep, key: TrainKey):
    """Unload a version now; requests still running on it end with a 503 (model_unloaded)."""
    version = resolve_version(db, ref, key=key)
    done = manager.unload(version.model.name, version.number)
    audit.record(db, action="model.unload", target=f"{version.model.name}@{version.number}", key_id=key.id,
                 detail={"was_loaded": done})
    return {"model": f"{version.model.name}@{version.number}", "unloaded": done}
