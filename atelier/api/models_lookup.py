"""Resolving a request's `model` field to a loaded model, with OpenAI-shaped errors."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from atelier.api.errors import APIError, bad_request, not_found
from atelier.storage.db import Version
from atelier.storage.registry import NotFound, resolve
from atelier.runtime.manager import TEXT_FAMILIES, LoadedModel


def resolve_version(db: Session, ref: str, param: str = "model") -> Version:
    try:
        return resolve(db, ref=ref)
    except NotFound as e:
        raise not_found(f"{e}", param=param, code="model_not_found") from None
    except ValueError as e:
        raise bad_request(str(e), param=param) from None


def load_text_model(request: Request, db: Session, ref: str) -> LoadedModel:
    version = resolve_version(db, ref)
    if version.model.family not in TEXT_FAMILIES:
        raise bad_request(f"model {version.model.name!r} ({version.model.task}) cannot generate text", "model",
                          code="model_not_supported")
    try:
        return request.app.state.manager.get(version)
    except (OSError, ValueError) as e:
        raise APIError(503, f"model {ref!r} could not be loaded: {e}", type="server_error",
                       code="model_load_failed") from None
