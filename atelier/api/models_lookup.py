"""Resolving a request's `model` field to a version, and holding it loaded in the runtime.

Every route that runs a model does `loaded = await acquire(...)` and, when its response is
finished (streams included), `manager.release(loaded, keep_alive)`.
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from atelier.api.errors import APIError, bad_request, not_found
from atelier.runtime.errors import EngineClosed, ModelTooLarge, WrongTask
from atelier.runtime.manager import Loaded, ModelManager, parse_keep_alive
from atelier.storage.db import Version
from atelier.storage.ownership import can_see_model, can_see_version
from atelier.storage.registry import NotFound, resolve, resolve_remembered


def resolve_version(db: Session, ref: str, param: str = "model", *, key, remembered: bool = False) -> Version:
    """The version `ref` names, if `key` may see it; a model or fine-tune of another key's is a 404
    exactly like one that does not exist (atelier/storage/ownership.py). `remembered`: maybe as resolved
    a moment ago, in no session (storage/registry.py resolve_remembered), for routes that only read it."""
    try:
        version = resolve_remembered(db, ref=ref) if remembered else resolve(db, ref=ref)
    except NotFound as e:
        raise not_found(f"{e}", param=param, code="model_not_found") from None
    except ValueError as e:
        raise bad_request(str(e), param=param) from None
    if not can_see_version(key, version):
        name = ref.split("@")[0].split(":")[0]
        message = f"model {name!r} does not exist" if not can_see_model(key, version.model) else \
            f"{ref!r} does not exist"
        raise not_found(message, param=param, code="model_not_found")
    return version


def check_keep_alive(value) -> None:
    """400 naming keep_alive when it is not a duration (checked before anything is loaded)."""
    if value is not None:
        try:
            parse_keep_alive(value)
        except ValueError as e:
            raise bad_request(str(e), "keep_alive") from None


async def acquire(manager: ModelManager, db: Session, ref: str, *, key, tasks: tuple[str, ...] | None,
                  keep_alive=None, param: str = "model") -> Loaded:
    """The model `ref` loaded and held for this request: 404 unknown, 400 wrong task, 503 not loadable.
    Loading can take seconds, so it runs in a worker thread, never on the event loop."""
    check_keep_alive(keep_alive)
    version = resolve_version(db, ref, param, key=key, remembered=True)
    try:
        return manager.acquire_loaded(version, tasks=tasks) or await run_in_threadpool(manager.acquire, version,
                                                                                       tasks=tasks)
    except WrongTask as e:
        raise bad_request(f"{e}; GET /v1/models lists each model's task", param, code="model_not_supported") from None
    except ModelTooLarge as e:
        raise APIError(503, str(e), type="server_error", code="model_too_large") from None
    except (OSError, ValueError) as e:
        raise APIError(503, f"model {ref!r} could not be loaded: {e}", type="server_error",
                       code="model_load_failed") from None


def unloaded(e: EngineClosed) -> APIError:
    """The model went away under a request (evicted, unloaded, server stopping): a 503 to retry."""
    return APIError(503, str(e), type="server_error", code="model_unloaded")
