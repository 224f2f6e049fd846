"""Running one job: the model-development pipeline, each stage visible as an event.

  1. validate files      the uploads exist and suit the family
  2. prepare data        the files' bytes are copied into the job's folder
  3. build the model     from the base version (fine-tuning) or from the family's config
  4. train               events: loss, lr, tokens/s, eval loss, checkpoints, early stop
  5. register            a new version with lineage (base, files, hyper-parameters, job id)
A job whose worker dies resumes at step 4 from its last checkpoint: the job folder keeps it.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from atelier.config import Settings
from atelier.families import FAMILIES, TrainError, TrainJob
from atelier.jobs import store
from atelier.storage.blobs import BlobStore
from atelier.storage.db import ApiKey, File, Job
from atelier.storage.ownership import owner_for
from atelier.storage.registry import get_model, register_trained, resolve, set_alias, version_folder

log = logging.getLogger("atelier.jobs")


class EventSink:
    """Trainer events → job events (and checkpoint rows)."""

    def __init__(self, sessions, job_id: str):
        self.sessions, self.job_id = sessions, job_id

    def __call__(self, e: dict) -> None:
        kind = e["type"]
        with self.sessions() as db:
            if kind == "train":
                rate = {k: e[k] for k in ("tokens_per_s", "images_per_s") if k in e}  # text or image families
                data = {"step": e["step"], "total_steps": e["max_steps"], "train_loss": e["loss"], "lr": e["lr"]} | rate
                store.add_event(db, self.job_id, f"step {e['step']}/{e['max_steps']}: training loss={e['loss']:.4f}",
                                type="metrics", data=data)
            elif kind == "eval":
                name, value = next((k, e[k]) for k in ("val_loss", "val_d_margin") if k in e)
                data = {"step": e["step"], "valid_loss" if name == "val_loss" else name: value,
                        "improved": e["improved"]} | ({"valid_ppl": e["val_ppl"]} if "val_ppl" in e else {})
                store.add_event(db, self.job_id, f"step {e['step']}: validation {name.removeprefix('val_')}"
                                f"={value:.4f}", type="metrics", data=data)
            elif kind == "checkpoint":
                store.add_checkpoint(db, self.job_id, e["step"], {})
                store.add_event(db, self.job_id, f"checkpoint saved at step {e['step']}", data={"step": e["step"]})
            elif kind == "resumed":
                store.add_event(db, self.job_id, f"resumed from the checkpoint at step {e['step']}",
                                data={"step": e["step"]})
            elif kind == "start":
                size = f"{e['train_tokens']} tokens" if "train_tokens" in e else f"{e['train_images']} images"
                store.add_event(db, self.job_id, f"training: {e['max_steps']} steps over {size}, "
                                f"{e['params'] / 1e6:.2f} M parameters", data=e)
            elif kind == "early_stop":
                store.add_event(db, self.job_id, f"early stop at step {e['step']}: validation loss stopped "
                                f"improving (best at step {e['best_step']})", data=e)
            elif "message" in e:  # the tabular trainer's stages, CV folds, candidates and metrics
                store.add_event(db, self.job_id, e["message"], type="metrics" if kind in ("cv", "candidate", "metric")
                                else "message", data={k: v for k, v in e.items() if k != "message"})

    def stage(self, message: str) -> None:
        with self.sessions() as db:
            store.add_event(db, self.job_id, message, data={"stage": message.split(":")[0]})


def _export_file(db, blobs: BlobStore, file_id: str, folder: Path, param: str) -> tuple[File, Path]:
    f = db.get(File, file_id)
    if f is None:
        raise TrainError(f"file {file_id!r} no longer exists", code="file_not_found", param=param)
    dest = folder / f"{param}-{f.id}{Path(f.filename).suffix}"
    if not dest.exists():
        blobs.export(f.sha256, dest)
    return f, dest


def run_job(job_id: str, *, settings: Settings, sessions, blobs: BlobStore, shutting_down: threading.Event) -> None:
    with sessions() as db:
        job = db.get(Job, job_id)
    sink = EventSink(sessions, job_id)
    workdir = settings.home_dir / "jobs" / job_id
    data_dir = workdir / "data"
    unpacked: list[Path] = []  # versions unpacked for this job (a fine-tune's base, fusion members)
    data_dir.mkdir(parents=True, exist_ok=True)
    last_check = [0.0, False]

    def should_stop() -> bool:
        if shutting_down.is_set():
            return True
        if time.time() - last_check[0] > 1.0:  # poll the cancel flag at most once a second
            with sessions() as db:
                last_check[:] = [time.time(), bool(db.get(Job, job_id).cancel_requested)]
        return last_check[1]

    try:
        # 1. validate files  2. prepare data
        sink.stage(f"validating files: {job.training_file}" + (f", {job.validation_file}" if job.validation_file else ""))
        with sessions() as db:
            train_file, train_path = _export_file(db, blobs, job.training_file, data_dir, "training_file")
            val_path = None
            if job.validation_file:
                _, val_path = _export_file(db, blobs, job.validation_file, data_dir, "validation_file")
        family = FAMILIES[job.family]
        if train_file.format not in family.train_formats:
            raise TrainError(f"training file {train_file.id} is {train_file.format}; a {job.family} job needs "
                             f"{' or '.join(family.train_formats)}", code="invalid_training_file",
                             param="training_file")
        sink.stage(f"preparing data: {train_file.records} records from {train_file.filename}")
        # 3. build the model  4. train
        work = TrainJob(hyperparameters=dict(job.hyperparameters), seed=job.seed, train_path=train_path,
                        val_path=val_path, workdir=workdir, max_steps=settings.max_job_steps, on_event=sink,
                        stage=sink.stage, should_stop=should_stop,
                        version_folder=lambda ref: _version_folder(sessions, blobs, settings, ref, unpacked))
        if job.base_model != job.family:  # fine-tuning a version
            version, work.base = work.version_folder(job.base_model)
            work.base_ref, work.base_config = f"{version.model.name}@{version.number}", version.config
        folder = family.train(work)
        if work.trained_tokens is not None:
            with sessions() as db:
                db.get(Job, job.id).trained_tokens = work.trained_tokens
                db.commit()
        with sessions() as db:
            # Stopped by a cancellation, or one that came as training ended (the flag is read once a second):
            # the caller was told "cancelled", so nothing is registered.
            if db.get(Job, job_id).cancel_requested:
                store.finish(db, job, "cancelled")
                store.add_event(db, job_id, "job cancelled")
                return
        if folder is None:  # stopped by shutdown: resumed from its checkpoint
            return
        # 5. register
        sink.stage("registering the new version")
        _register(job, sessions, blobs, folder)
    except TrainError as e:
        with sessions() as db:
            store.finish(db, job, "failed", error={"code": e.code, "message": e.message, "param": e.param})
            store.add_event(db, job_id, f"job failed: {e.message}", level="error")
    except Exception as e:  # noqa: BLE001 — a job's failure must not take the worker down
        log.exception("job %s failed", job_id)
        with sessions() as db:
            store.finish(db, job, "failed", error={"code": "training_error", "message": f"{type(e).__name__}: {e}",
                                                   "param": None})
            store.add_event(db, job_id, f"job failed: {type(e).__name__}: {e}", level="error")
    finally:
        _clean_up(job_id, sessions, blobs, workdir, unpacked)


def _clean_up(job_id: str, sessions, blobs: BlobStore, workdir: Path, unpacked: list[Path]) -> None:
    """Plaintext never outlives its use: a finished job's folder (copies of the uploads, checkpoints,
    weights) is deleted — the new version is in the blob store — and so are the versions it unpacked
    (when the store is encrypted). A job stopped by shutdown keeps its folder, to resume from."""
    if blobs.encrypted:
        for folder in unpacked:
            shutil.rmtree(folder, ignore_errors=True)
    with sessions() as db:
        finished = db.get(Job, job_id).status in store.FINAL
    if finished:
        shutil.rmtree(workdir, ignore_errors=True)


def _version_folder(sessions, blobs: BlobStore, settings: Settings, ref: str, unpacked: list[Path]):
    """(version, its unpacked folder) for a reference, e.g. a fine-tune's base or a fusion member."""
    with sessions() as db:
        version = resolve(db, ref=ref)
        folder = version_folder(blobs, version, settings.home_dir / "versions")
    unpacked.append(folder)
    return version, folder


def _register(job: Job, sessions, blobs: BlobStore, folder: Path) -> None:
    lineage = {"job_id": job.id, "base_model": job.base_model, "training_file": job.training_file,
               "validation_file": job.validation_file, "hyperparameters": job.hyperparameters, "seed": job.seed}
    detail = {"job_id": job.id}
    with sessions() as db:
        owner = owner_for(db.get(ApiKey, job.key_id) if job.key_id else None)  # the job's key owns what it made
        # From scratch, or compressed (distilled, pruned) from a version: a new model named by the suffix.
        if job.base_model == job.family or job.hyperparameters.get("method") in ("distill", "prune"):
            import json

            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            v = register_trained(db, blobs, folder=folder, name=job.suffix, family=job.family,
                                 task=FAMILIES[job.family].task_of(config), training={"lineage": lineage},
                                 key_id=job.key_id, detail=detail, owner=owner)
            fine_tuned = f"{job.suffix}@{v.number}"
        else:  # fine-tuning: a new version of the base model under the alias ft-<suffix>
            base = resolve(db, ref=job.base_model)
            alias = f"ft-{job.suffix or job.id[-8:]}"
            v = register_trained(db, blobs, folder=folder, name=base.model.name, family=base.model.family,
                                 task=base.model.task, aliases=(), key_id=job.key_id, detail=detail,
                                 training={"lineage": lineage | {"base_version": base.number}, "owner": owner})
            set_alias(db, model=get_model(db, name=base.model.name), alias=alias, number=v.number)
            db.commit()
            fine_tuned = f"{base.model.name}:{alias}"
        store.finish(db, job, "succeeded", fine_tuned_model=fine_tuned)
        store.add_event(db, job.id, f"new version {v.model.name}@{v.number} registered as {fine_tuned}",
                        data={"version": f"{v.model.name}@{v.number}", "fine_tuned_model": fine_tuned})
