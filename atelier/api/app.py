"""The FastAPI app factory: settings → storage → bootstrap → routers → middleware."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from atelier import __version__
from atelier.api import errors, metering, security_headers
from atelier.api.limits import body_limit, key_gate
from atelier.api.metrics import Metrics
from atelier.api.routes import artifacts, audit, completions, files, fine_tuning, health, images, keys, lifecycle
from atelier.api.routes import models, moderations, music, poems, predict, privacy, runtime, styles, usage
from atelier.common import native
from atelier.config import PACKAGE_DIR, Settings, get_settings, image_threads, inference_threads, step_threads
from atelier.jobs.supervisor import WorkerSupervisor
from atelier.storage.db import make_engine, make_sessionmaker, startup_lock
from atelier.families.shipped import ensure_shipped
from atelier.safety.crypto import audit_mac_key
from atelier.storage.usage import InFlight
from atelier.storage.usage_writer import UsageWriter
from atelier.storage.blobs import BlobStore, open_blobs
from atelier.runtime.manager import ModelManager, settle_heap
from atelier.storage import audit as audit_log
from atelier.storage.keys import KeyCache, create_key, list_keys

log = logging.getLogger("atelier")


def bootstrap(settings: Settings, sessions, blobs: BlobStore) -> str | None:
    """First start: create the admin key (returned once, stored hashed); register shipped models."""
    secret = None
    with sessions() as db:
        if not list_keys(db):
            key, secret = create_key(db, name="admin", scopes=["admin"], secret=settings.admin_key)
            audit_log.record(db, action="key.create", target=key.id, detail={"scopes": key.scopes, "bootstrap": True})
        if settings.shipped_models:
            for ref in ensure_shipped(db, blobs):
                log.info("registered shipped model %s", ref)
    return secret


def remote_runtime(settings: Settings):
    """Engine processes when ATELIER_RUNTIME=process, Ray Serve's deployments when ray (None: engines run
    in this process)."""
    if settings.runtime == "process":
        from atelier.runtime.engine_process import ProcessRuntime

        return ProcessRuntime(settings)
    if settings.runtime != "ray":
        return None
    try:
        from atelier.runtime.ray_serve import RayRuntime
    except ImportError as e:
        raise RuntimeError(f"ATELIER_RUNTIME=ray needs Ray Serve ({e}): pip install -e '.[ray]'") from None
    return RayRuntime(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(inference_threads(settings))
    native.use(settings.native, step_threads(settings))
    engine = make_engine(settings.db_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    sessions = make_sessionmaker(engine, audit_key=audit_mac_key(settings), remember_s=settings.lookup_cache_s)
    blobs = open_blobs(settings)  # sealed with the data key unless ATELIER_ENCRYPT_AT_REST=false
    # Shown once by `atelier serve` (never logged); only its hash is stored. Replicas starting together
    # over one PostgreSQL take turns, so there is one admin key and one version of each shipped model.
    with engine.connect() as conn, startup_lock(conn):
        new_admin_secret = bootstrap(settings, sessions, blobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.run_worker:
            app.state.worker = WorkerSupervisor(settings)
            app.state.worker.start()
        settle_heap()  # what the server built at start stays: out of the collector's passes (runtime/manager.py)
        yield
        if app.state.worker is not None:
            app.state.worker.stop()
        app.state.manager.close()
        app.state.usage_writer.close()
        engine.dispose()

    app = FastAPI(title="Atelier", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Creative models as a service, in OpenAI's dialect.")
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.keys = app_keys = KeyCache(sessions, settings.lookup_cache_s)  # the keys requests name, for a moment
    app.state.blobs = blobs
    app.state.metrics = Metrics()
    app.state.manager = ModelManager(blobs, settings.home_dir / "versions", max_loaded=settings.max_loaded_models,
                                     max_memory=settings.max_model_memory, keep_alive=settings.keep_alive,
                                     max_batch=settings.max_batch, kv_cache_dtype=settings.kv_cache_dtype,
                                     prefix_cache=settings.prefix_cache, prefill_chunk=settings.prefill_chunk,
                                     image_max_batch=settings.image_max_batch,
                                     image_wait_ms=settings.image_batch_wait_ms, image_threads=image_threads(settings),
                                     remote=remote_runtime(settings))
    app.state.inflight = InFlight()  # requests running per key (max_parallel)
    app.state.usage_writer = UsageWriter(sessions, blobs)  # what finished requests served, written behind them
    app.state.new_admin_secret = new_admin_secret
    app.state.worker = None
    errors.install(app)
    for r in (health.router, models.router, completions.router, files.router, fine_tuning.router, runtime.router,
              lifecycle.router, poems.router, music.router, keys.router, audit.router, predict.router, images.router, styles.router,
              artifacts.router, moderations.router, privacy.router, usage.router):
        app.include_router(r)
    studio = PACKAGE_DIR / "studio"
    if (studio / "index.html").exists():
        app.mount("/studio", StaticFiles(directory=studio, html=True), name="studio")

        @app.get("/", include_in_schema=False)
        def root():
            return RedirectResponse("/studio/")

    app.add_middleware(lambda app: body_limit(app, settings.max_body_bytes, settings.max_upload_bytes,
                                              timeout_s=settings.body_timeout_s))
    app.add_middleware(lambda app: key_gate(app, app_keys))  # before the body limit: a keyless body is never read
    app.add_middleware(lambda app, metrics=app.state.metrics: metrics.middleware(app))
    app.add_middleware(security_headers.studio_headers)
    app.add_middleware(metering.usage_middleware)
    return app
