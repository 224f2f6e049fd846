"""Jobs in the database: create, claim, events, checkpoints, finish. Plain functions."""

from __future__ import annotations

import calendar
import secrets
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from atelier.safety.redact import redact, redact_obj
from atelier.storage.db import Job, JobCheckpoint, JobEvent, utcnow

FINAL = ("succeeded", "failed", "cancelled")


def ts(dt) -> int | None:
    return calendar.timegm(dt.timetuple()) if dt else None


def create_job(db: Session, **fields) -> Job:
    job = Job(id="ftjob-" + secrets.token_hex(12), status="queued", **fields)
    db.add(job)
    db.flush()
    add_event(db, job.id, f"job created: {job.family} from {job.base_model}", commit=False)
    db.commit()
    return job


def add_event(db: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict | None = None, commit: bool = True) -> JobEvent:
    # Events quote file names and errors: personal data in them is redacted (atelier/safety/redact.py).
    ev = JobEvent(job_id=job_id, message=redact(message).text, level=level, type=type, data=redact_obj(data or {}))
    db.add(ev)
    if commit:
        db.commit()
    return ev


def claim_next(db: Session, *, owner: str, lease_s: float) -> Job | None:
    """Atomically move the oldest queued job to running, leased to `owner` for lease_s seconds (safe with
    several claimers: the UPDATE only matches while the job is still queued, so exactly one wins)."""
    for job in db.scalars(select(Job).where(Job.status == "queued").order_by(Job.created_at)):
        now = utcnow()
        won = db.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                         .values(status="running", started_at=now, attempts=Job.attempts + 1, lease_owner=owner,
                                 lease_until=now + timedelta(seconds=lease_s))).rowcount
        db.commit()
        if won:
            db.refresh(job)
            return job
    return None


def renew_leases(db: Session, *, owner: str, lease_s: float) -> int:
    """Extend the leases of the jobs `owner` runs; returns how many it still holds."""
    held = db.execute(update(Job).where(Job.lease_owner == owner, Job.status == "running")
                      .values(lease_until=utcnow() + timedelta(seconds=lease_s))).rowcount
    db.commit()
    return held


MAX_ATTEMPTS = 3  # a job whose worker dies this many times is failed, not retried for ever


def requeue_orphans(db: Session, *, owner: str | None = None, graceful: bool = False) -> list[str]:
    """Running jobs whose worker is gone: queue them again (they resume from checkpoints).

    A worker is gone when its lease ran out (it died on any replica, or lost the database), and a
    worker starting under `owner` knows that jobs leased to `owner` were its dead predecessor's. After a
    crash the attempt counts, and a job that has used MAX_ATTEMPTS fails instead. `graceful`: `owner`
    is stopping and hands back its own jobs only; that attempt does not count."""
    gone = Job.lease_owner == owner if graceful else or_(
        Job.lease_owner == owner, Job.lease_until.is_(None), Job.lease_until < utcnow())
    requeued = []
    for job in db.scalars(select(Job).where(Job.status == "running", gone)).all():
        # Matched again on the lease: a worker that renewed it meanwhile keeps its job.
        still = update(Job).where(Job.id == job.id, Job.status == "running", Job.lease_owner == job.lease_owner,
                                  Job.lease_until == job.lease_until if job.lease_until else Job.lease_until.is_(None))
        released = dict(lease_owner=None, lease_until=None)
        if graceful:
            change = dict(status="queued", attempts=Job.attempts - 1)
            event = ("worker stopped: job queued again, it resumes from its last checkpoint", "info")
        elif job.attempts >= MAX_ATTEMPTS:
            change = dict(status="failed", finished_at=utcnow(), error={
                "code": "worker_died", "param": None,
                "message": f"the worker died {job.attempts} times running this job; it is not retried again"})
            event = (f"job failed: the worker died {job.attempts} times running it", "error")
        else:
            change = dict(status="queued")
            event = ("worker lost: job queued again, it resumes from its last checkpoint", "warn")
        if db.execute(still.values(**change, **released)).rowcount:
            add_event(db, job.id, event[0], level=event[1], commit=False)
            requeued.append(job.id)
    db.commit()
    return requeued


def finish(db: Session, job: Job, status: str, **fields) -> None:
    db.execute(update(Job).where(Job.id == job.id).values(status=status, finished_at=utcnow(), lease_owner=None,
                                                          lease_until=None, **fields))
    db.commit()


def add_checkpoint(db: Session, job_id: str, step: int, metrics: dict) -> None:
    db.add(JobCheckpoint(job_id=job_id, step=step, metrics=metrics))
    db.commit()


def job_public(job: Job) -> dict:
    return {"id": job.id, "object": "fine_tuning.job", "model": job.base_model, "created_at": ts(job.created_at),
            "finished_at": ts(job.finished_at), "fine_tuned_model": job.fine_tuned_model,
            "organization_id": "atelier", "result_files": [], "status": job.status,
            "validation_file": job.validation_file, "training_file": job.training_file,
            "hyperparameters": job.hyperparameters, "trained_tokens": job.trained_tokens, "error": job.error,
            "seed": job.seed, "suffix": job.suffix, "estimated_finish": None, "integrations": [],
            "method": {"type": "supervised"}, "family": job.family, "attempts": job.attempts}


def event_public(ev: JobEvent) -> dict:
    return {"id": f"ftevent-{ev.id}", "object": "fine_tuning.job.event", "created_at": ts(ev.created_at),
            "level": ev.level, "message": ev.message, "data": ev.data, "type": ev.type}


def checkpoint_public(cp: JobCheckpoint, job: Job) -> dict:
    return {"id": f"ftckpt-{cp.id}", "object": "fine_tuning.job.checkpoint", "created_at": ts(cp.created_at),
            "fine_tuning_job_id": job.id, "step_number": cp.step, "metrics": cp.metrics,
            "fine_tuned_model_checkpoint": f"{job.id}:step-{cp.step}"}
