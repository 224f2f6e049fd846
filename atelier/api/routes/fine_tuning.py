"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints.

Jobs run in the worker process (atelier/jobs/worker.py); these routes only read and write
the job table.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from atelier.api.deps import SessionDep, TrainKey
from atelier.api.errors import APIError, bad_request, not_found
from atelier.api.models_lookup import resolve_version
from atelier.api.uploads import get_file
from atelier.storage.ownership import can_change_model, can_see_version, is_admin, owns
from atelier.jobs import store
from atelier.families import FAMILIES, TrainError, trainable
from atelier.storage.db import Job, JobCheckpoint, JobEvent, Model
from atelier.storage import audit

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
SUFFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class Supervised(BaseModel):
    hyperparameters: dict = Field(default_factory=dict)


class Method(BaseModel):
    """OpenAI's `method`, with Atelier's compression methods beside `supervised`: `distill` trains a smaller
    model on the base version's outputs, `prune` drops the base's least important MLP channels and
    fine-tunes what is left (atelier/training/compress.py). Both make a new model named by the suffix."""

    type: str = "supervised"
    supervised: Supervised | None = None
    distill: Supervised | None = None
    prune: Supervised | None = None


COMPRESSING = ("distill", "prune")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: dict = Field(default_factory=dict)
    method: Method | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


def get_job(db, job_id: str, key) -> Job:
    """The job, if it is `key`'s (or `key` is an admin's); another key's job is a 404 like a missing one."""
    job = db.get(Job, job_id)
    if job is None or not owns(key, job.key_id):
        raise not_found(f"fine-tuning job {job_id!r} does not exist", "fine_tuning_job_id")
    return job


@router.post("")
def create(body: JobCreate, db: SessionDep, key: TrainKey):
    """Queue a job: fine-tune a model version (chargpt, ddpm, dcgan), or train a family from scratch."""
    method = body.method.type if body.method is not None else "supervised"
    if method not in ("supervised", *COMPRESSING):
        raise bad_request(f"method.type {method!r} is not supported; use 'supervised', 'distill' or 'prune'",
                          "method.type")
    hyper = dict(body.hyperparameters)
    given = getattr(body.method, method, None) if body.method is not None else None
    if given is not None:
        hyper |= given.hyperparameters
    if method in COMPRESSING:
        if body.model in FAMILIES:
            raise bad_request(f"method {method!r} compresses a model version: give one as model (e.g. tang-poet@1)",
                              "model")
        if not body.suffix:
            raise bad_request(f"a {method} job makes a new model: its name is the suffix", "suffix")
        hyper["method"] = method
    if body.suffix is not None and not SUFFIX_RE.match(body.suffix):
        raise bad_request(f"suffix {body.suffix!r} must match {SUFFIX_RE.pattern}", "suffix")
    if body.model in FAMILIES:
        family = body.model
        if family not in trainable():
            raise bad_request(f"{family} models cannot be trained as jobs; trainable families: "
                              f"{', '.join(trainable())}", "model", code="model_not_supported")
        if not body.suffix:
            raise bad_request(f"training {family} from scratch needs a suffix: the new model's name", "suffix")
        taken = db.scalar(select(Model).where(Model.name == body.suffix))
        if taken is not None and not can_change_model(key, taken):
            raise APIError(409, f"suffix {body.suffix!r} names a model this key does not own; choose another",
                           param="suffix", code="suffix_taken")
    else:
        version = resolve_version(db, body.model, key=key)
        family = version.model.family
        if method in COMPRESSING:
            taken = db.scalar(select(Model).where(Model.name == body.suffix))
            if taken is not None and (taken.family != family or not can_change_model(key, taken)):
                raise APIError(409, f"suffix {body.suffix!r} names a model this key cannot add a {family} version "
                               "to; choose another", param="suffix", code="suffix_taken")
        if not FAMILIES[family].fine_tunable:
            fine_tunable = ", ".join(n for n, f in FAMILIES.items() if f.fine_tunable)
            raise bad_request(f"model {version.model.name!r} ({family}) does not support fine-tuning; "
                              f"fine-tunable families: {fine_tunable}", "model", code="model_not_supported")
        alias = next((a for a in version.model.aliases if a.name == f"ft-{body.suffix}"), None) if body.suffix else None
        if alias is not None:
            target = next((v for v in version.model.versions if v.number == alias.version_number), None)
            if target is not None and not can_see_version(key, target):
                raise APIError(409, f"suffix {body.suffix!r} is another key's fine-tune of {version.model.name}; "
                               "choose another", param="suffix", code="suffix_taken")
    formats = FAMILIES[family].train_formats
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is None:
            continue
        f = get_file(db, file_id, param, key=key)
        if f.purpose != "fine-tune":
            raise bad_request(f"{param} {file_id} has purpose {f.purpose!r}, not 'fine-tune'", param)
        if f.format not in formats:
            raise bad_request(f"{param} {file_id} is {f.format}; a {family} job needs {' or '.join(formats)}", param,
                              code="invalid_file_format")
    try:
        hyper = FAMILIES[family].check_hyperparameters(hyper)
    except TrainError as e:
        raise bad_request(e.message, e.param) from None
    job = store.create_job(db, base_model=body.model, family=family, suffix=body.suffix,
                           training_file=body.training_file, validation_file=body.validation_file,
                           hyperparameters=hyper, seed=body.seed if body.seed is not None else 42, key_id=key.id)
    audit.record(db, action="job.create", target=job.id, key_id=key.id, detail={"model": body.model})
    return store.job_public(job)


@router.get("")
def list_jobs(db: SessionDep, key: TrainKey, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    """Jobs, newest first; `after` is a job id to page from."""
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if not is_admin(key):
        q = q.where(Job.key_id == key.id)
    if after:
        anchor = get_job(db, after, key)
        q = q.where(Job.created_at <= anchor.created_at, Job.id != anchor.id)
    jobs = list(db.scalars(q.limit(limit + 1)))
    return {"object": "list", "data": [store.job_public(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@router.get("/{job_id}")
def retrieve(job_id: str, db: SessionDep, key: TrainKey):
    """One job."""
    return store.job_public(get_job(db, job_id, key))


@router.post("/{job_id}/cancel")
def cancel(job_id: str, db: SessionDep, key: TrainKey):
    """Cancel a queued or running job; a finished job cannot be cancelled (409)."""
    job = get_job(db, job_id, key)
    if job.status in store.FINAL:
        raise APIError(409, f"job {job_id} is already {job.status}", param="fine_tuning_job_id",
                       code="job_not_cancellable")
    job.cancel_requested = True
    if job.status == "queued":
        job.status = "cancelled"
    db.commit()
    store.add_event(db, job_id, "cancellation requested")
    audit.record(db, action="job.cancel", target=job_id, key_id=key.id)
    db.refresh(job)
    return store.job_public(job) | {"status": "cancelled"}


@router.get("/{job_id}/events")
def events(job_id: str, db: SessionDep, key: TrainKey, after: str | None = None,
           limit: int = Query(20, ge=1, le=1000), order: str = Query("desc", pattern="^(asc|desc)$")):
    """Events, newest first (OpenAI's order) or `order=asc`; `after` is an event id to page from."""
    get_job(db, job_id, key)
    q = select(JobEvent).where(JobEvent.job_id == job_id)
    if after:
        if not re.fullmatch(r"ftevent-[0-9]{1,19}", after) or int(after.split("-")[1]) > 2**63 - 1:
            raise bad_request(f"after={after[:64]!r} is not an event id (ftevent-N, N below 2**63)", "after")
        n = int(after.split("-")[1])
        q = q.where(JobEvent.id > n if order == "asc" else JobEvent.id < n)
    q = q.order_by(JobEvent.id.asc() if order == "asc" else JobEvent.id.desc()).limit(limit + 1)
    rows = list(db.scalars(q))
    return {"object": "list", "data": [store.event_public(e) for e in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/{job_id}/checkpoints")
def checkpoints(job_id: str, db: SessionDep, key: TrainKey, limit: int = Query(10, ge=1, le=100)):
    """Checkpoints, newest first."""
    job = get_job(db, job_id, key)
    rows = list(db.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                           .order_by(JobCheckpoint.id.desc()).limit(limit)))
    return {"object": "list", "data": [store.checkpoint_public(c, job) for c in rows], "has_more": False}
