"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from atelier.api.deps import ReadKey, SessionDep, key_from_header
from atelier.api.errors import APIError
from atelier.safety.keys import has_scope

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """The process is up (no key needed)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, db: SessionDep):
    """The database answers and the models are registered (no key needed; names and pids only with a key)."""
    try:
        db.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 — any database failure means not ready
        raise APIError(503, f"database unavailable: {type(e).__name__}", type="server_error", code="not_ready")
    worker, loaded = request.app.state.worker, request.app.state.manager.loaded()
    if not _reads(request):
        # Anyone may probe readiness, but which (private) models are loaded is a key holder's business.
        return {"status": "ready", "loaded_models": len(loaded),
                "worker": {"alive": worker.status()["alive"]} if worker else None}
    return {"status": "ready", "loaded_models": len(loaded), "models": loaded,
            "worker": worker.status() if worker else None}


def _reads(request: Request) -> bool:
    """Whether the request carries a valid key with the read scope (a missing or bad key is no error here)."""
    try:
        return has_scope(key_from_header(request.app.state.keys, request.headers.get("authorization", "")), "read")
    except APIError:
        return False


@router.get("/metrics")
def metrics(request: Request, key: ReadKey):
    """Prometheus text format (needs a key, like every route but /healthz and /readyz)."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
