"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from atelier.api.deps import ReadKey, SessionDep
from atelier.api.errors import APIError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """The process is up (no key needed)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, db: SessionDep):
    """The database answers and the models are registered (no key needed)."""
    try:
        db.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 — any database failure means not ready
        raise APIError(503, f"database unavailable: {type(e).__name__}", type="server_error", code="not_ready")
    worker = request.app.state.worker
    return {"status": "ready", "loaded_models": request.app.state.manager.loaded(),
            "worker": worker.status() if worker else None}


@router.get("/metrics")
def metrics(request: Request, key: ReadKey):
    """Prometheus text format (needs a key, like every route but /healthz and /readyz)."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
