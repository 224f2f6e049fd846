"""Request dependencies as Annotated aliases: settings, database, blob store, runtime, the caller's key."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from atelier.api.errors import APIError
from atelier.api.metrics import Metrics
from atelier.config import Settings
from atelier.safety.moderation import Moderator
from atelier.runtime.manager import ModelManager
from atelier.storage.blobs import BlobStore
from atelier.storage.db import ApiKey
from atelier.safety.keys import has_scope
from atelier.storage.keys import KeyCache


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    with request.app.state.sessions() as db:
        yield db


async def get_written_db(request: Request) -> AsyncIterator[Session]:
    """A session for reading usage or the audit log: first, what finished requests served is written
    (atelier/storage/usage_writer.py), so every request that has ended is there."""
    await run_in_threadpool(request.app.state.usage_writer.flush)
    with request.app.state.sessions() as db:
        yield db


async def get_stored_db(request: Request) -> AsyncIterator[Session]:
    """A session for reading artifacts: first, those being stored behind the responses that named them are
    written (atelier/storage/usage_writer.py), so an id a response gave is there."""
    writer = request.app.state.usage_writer
    if writer.storing():
        await run_in_threadpool(writer.flush)
    with request.app.state.sessions() as db:
        yield db


async def get_sessions(request: Request) -> sessionmaker:
    """The session factory, for work that outlives the request's own session (threads, streams)."""
    return request.app.state.sessions


async def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


async def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


_build_lock = threading.Lock()  # one moderator per app, built once


async def get_moderator(request: Request) -> Moderator:
    """The app's moderator, built on first use from the shipped lists and ATELIER_HOME/moderation/
    (edits to the lists take effect at the next start)."""
    state = request.app.state
    moderator = getattr(state, "moderator", None)
    if moderator is None:
        with _build_lock:
            moderator = getattr(state, "moderator", None)
            if moderator is None:
                try:
                    moderator = Moderator.load(state.settings.home_dir)
                except ValueError as e:  # an operator's list is broken: not the client's fault
                    raise APIError(500, f"the moderation lists are invalid: {e}", type="server_error",
                                   code="moderation_lists_invalid") from None
                state.moderator = moderator
    return moderator


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_db)]
WrittenSessionDep = Annotated[Session, Depends(get_written_db)]
StoredSessionDep = Annotated[Session, Depends(get_stored_db)]
SessionsDep = Annotated[sessionmaker, Depends(get_sessions)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ModeratorDep = Annotated[Moderator, Depends(get_moderator)]


def key_from_header(keys: KeyCache, header: str) -> ApiKey:
    """The active key an `Authorization: Bearer <key>` header names; a 401 saying what is wrong otherwise.
    The one reading of the header: the routes' dependency, the gate before bodies and /readyz use it."""
    scheme, _, secret = header.partition(" ")
    if not header:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                       code="missing_api_key")
    if scheme.lower() != "bearer" or not secret.strip():
        raise APIError(401, "malformed Authorization header: expected 'Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")
    key = keys.find(secret.strip())
    if key is None:
        raise APIError(401, "invalid or revoked API key", type="authentication_error", code="invalid_api_key")
    return key


def request_key(request: Request, db: Session) -> ApiKey:
    """The caller's key, in the request's session: the one limits.key_gate already found for this request,
    else the header's."""
    found = getattr(request.state, "gate_key", None) or \
        key_from_header(request.app.state.keys, request.headers.get("authorization", ""))
    key = db.merge(found, load=False)
    request.state.key_id = key.id
    return key


async def current_key(request: Request, db: SessionDep) -> ApiKey:
    return request_key(request, db)


def require(scope: str):
    async def check(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
        if not has_scope(key, scope):
            raise APIError(403, f"this key's scopes ({', '.join(key.scopes)}) do not allow this route; "
                                f"it needs '{scope}'", type="permission_error", code="insufficient_scope")
        return key
    return check


ReadKey = Annotated[ApiKey, Depends(require("read"))]
GenerateKey = Annotated[ApiKey, Depends(require("generate"))]
TrainKey = Annotated[ApiKey, Depends(require("train"))]
AdminKey = Annotated[ApiKey, Depends(require("admin"))]
