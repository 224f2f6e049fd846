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
import math
import shutil
import threading
import time
from pathlib import Path

from atelier.config import Settings
from atelier.jobs import store
from atelier.storage.db import File, Job
from atelier.storage.blobs import BlobStore
from atelier.storage.registry import get_model, register_version, resolve, set_alias, version_folder
from atelier.storage import audit
from atelier.training.trainer import TrainConfig

log = logging.getLogger("atelier.jobs")

TEXT_FORMATS = ("jsonl-text", "jsonl-prompt", "jsonl-chat", "text")
TABLE_FORMATS = ("csv", "jsonl-table")
IMAGE_FORMATS = ("npz",)
FAMILIES = ("chargpt", "sklearn", "ddpm", "dcgan")
IMAGE_FAMILIES = ("ddpm", "dcgan")
IMAGE_HYPER = ("max_steps", "batch_size", "learning_rate_multiplier", "eval_every", "warmup_steps", "grad_clip")


def file_formats(family: str) -> tuple[str, ...]:
    """The upload formats a family trains on."""
    return {"sklearn": TABLE_FORMATS, "ddpm": IMAGE_FORMATS, "dcgan": IMAGE_FORMATS}.get(family, TEXT_FORMATS)
# Hyper-parameters a job accepts: OpenAI's three, then Atelier's own.
HYPER_RANGES = {
    "n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-3, 10.0),
    "max_steps": (1, None), "warmup_steps": (0, 10_000), "eval_every": (1, 100_000),
    "early_stopping_patience": (1, 100), "grad_clip": (0.0, 100.0),
    "n_embd": (8, 1024), "n_layer": (1, 24), "n_head": (1, 32), "context": (8, 1024), "min_count": (1, 1000),
}
HYPER_CHOICES = {"optimizer": ("adamw", "sgd"), "schedule": ("cosine", "linear", "constant"),
                 "precision": ("fp32", "bf16")}
SCRATCH_DEFAULTS = dict(n_embd=64, n_layer=2, n_head=4, context=64, min_count=1)


class JobError(Exception):
    def __init__(self, message: str, code: str = "invalid_job", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def check_hyperparameters(hyper: dict, family: str) -> dict:
    """Validate a job's hyper-parameters; JobError names the bad one and its range."""
    if family == "sklearn":
        return _check_tabular_hyperparameters(hyper)
    out = {}
    for name, value in hyper.items():
        if family in IMAGE_FAMILIES and name not in IMAGE_HYPER:
            raise JobError(f"unknown hyper-parameter {name!r} for {family}; accepted: {', '.join(IMAGE_HYPER)}",
                           param="hyperparameters")
        if value == "auto":
            continue
        if name in HYPER_CHOICES:
            if value not in HYPER_CHOICES[name]:
                raise JobError(f"hyperparameters.{name}={value!r} is not one of {', '.join(HYPER_CHOICES[name])}",
                               param=f"hyperparameters.{name}")
        elif name in HYPER_RANGES:
            lo, hi = HYPER_RANGES[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= lo and \
                (hi is None or value <= hi)
            if ok and name != "learning_rate_multiplier" and name != "grad_clip" and not float(value).is_integer():
                ok = False
            if not ok:
                raise JobError(f"hyperparameters.{name}={value!r} must be a number in [{lo}, {hi or '∞'}]",
                               param=f"hyperparameters.{name}")
        else:
            raise JobError(f"unknown hyper-parameter {name!r}; accepted: "
                           f"{', '.join(sorted([*HYPER_RANGES, *HYPER_CHOICES]))}", param="hyperparameters")
        out[name] = value
    return out


def _check_tabular_hyperparameters(hyper: dict) -> dict:
    """What can be checked before the table is read; the tabular trainer checks the rest."""
    from atelier.training.tabular import ESTIMATORS, FUSE_KEYS, HYPER_KEYS

    keys = [k for k in hyper if k != "fuse"] if "fuse" in hyper else list(hyper)
    allowed = FUSE_KEYS if "fuse" in hyper else HYPER_KEYS
    for name in keys:
        if name not in allowed:
            raise JobError(f"unknown hyper-parameter {name!r}; accepted: {', '.join(allowed)}",
                           param="hyperparameters")
    if "fuse" not in hyper and not isinstance(hyper.get("target"), str):
        raise JobError("hyperparameters.target must name the column to predict", param="hyperparameters.target")
    if "estimator" in hyper and hyper["estimator"] not in ESTIMATORS:
        raise JobError(f"hyperparameters.estimator={hyper['estimator']!r} is not one of {', '.join(ESTIMATORS)}",
                       param="hyperparameters.estimator")
    cv = hyper.get("cv", 5)
    if not isinstance(cv, int) or isinstance(cv, bool) or not 2 <= cv <= 20:
        raise JobError(f"hyperparameters.cv={cv!r} must be an integer from 2 to 20", param="hyperparameters.cv")
    return hyper


def train_config(hyper: dict, *, fine_tune: bool, train_tokens: int, block: int, seed: int, max_steps_limit: int
                 ) -> tuple[TrainConfig, bool]:
    """Hyper-parameters → TrainConfig; also whether the step count was capped."""
    h = {k: v for k, v in hyper.items() if v != "auto"}
    batch = int(h.get("batch_size", 8 if fine_tune else 16))
    lr = (3e-4 if fine_tune else 2e-3) * float(h.get("learning_rate_multiplier", 1.0))
    epochs = int(h.get("n_epochs", 3))
    steps = int(h.get("max_steps", max(1, math.ceil(epochs * train_tokens / (batch * block)))))
    capped = steps > max_steps_limit
    steps = min(steps, max_steps_limit)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, lr=lr, warmup_steps=int(h.get("warmup_steps", min(20, steps // 10))),
                      schedule=h.get("schedule", "cosine"), optimizer=h.get("optimizer", "adamw"),
                      precision=h.get("precision", "fp32"), grad_clip=float(h.get("grad_clip", 1.0)),
                      eval_every=int(h.get("eval_every", max(1, steps // 10))),
                      patience=int(h.get("early_stopping_patience", 5)), log_every=max(1, min(10, steps // 20)),
                      eval_batches=4, seed=seed)
    return cfg, capped


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
        raise JobError(f"file {file_id!r} no longer exists", code="file_not_found", param=param)
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
        allowed = file_formats(job.family)
        if train_file.format not in allowed:
            raise JobError(f"training file {train_file.id} is {train_file.format}; a {job.family} job needs "
                           f"{' or '.join(allowed)}", code="invalid_training_file", param="training_file")
        sink.stage(f"preparing data: {train_file.records} records from {train_file.filename}")
        if job.family == "sklearn":
            folder = _train_tabular(job, settings, sessions, blobs, train_path, val_path, workdir, sink)
        elif job.family in IMAGE_FAMILIES:
            folder = _train_image_model(job, settings, sessions, blobs, train_path, workdir, sink, should_stop)
        else:
            folder = _train_chargpt(job, settings, sessions, blobs, train_path, val_path, workdir, sink, should_stop)
        if folder is None:  # stopped
            with sessions() as db:
                if db.get(Job, job_id).cancel_requested:
                    store.finish(db, job, "cancelled")
                    store.add_event(db, job_id, "job cancelled")
            return
        # 5. register
        sink.stage("registering the new version")
        _register(job, sessions, blobs, folder)
    except JobError as e:
        with sessions() as db:
            store.finish(db, job, "failed", error={"code": e.code, "message": e.message, "param": e.param})
            store.add_event(db, job_id, f"job failed: {e.message}", level="error")
    except Exception as e:  # noqa: BLE001 — a job's failure must not take the worker down
        log.exception("job %s failed", job_id)
        with sessions() as db:
            store.finish(db, job, "failed", error={"code": "training_error", "message": f"{type(e).__name__}: {e}",
                                                   "param": None})
            store.add_event(db, job_id, f"job failed: {type(e).__name__}: {e}", level="error")


def _train_chargpt(job, settings, sessions, blobs, train_path, val_path, workdir, sink, should_stop):
    from atelier.training.run import train_chargpt
    from atelier.training.corpus import load_corpus

    # 3. build the model
    base, block = None, None
    hyper = dict(job.hyperparameters)
    if job.base_model != "chargpt":
        with sessions() as db:
            version = resolve(db, ref=job.base_model)
            base = version_folder(blobs, version, settings.home_dir / "versions")
            block = version.config.get("n_positions")
        sink.stage(f"building the model: fine-tuning {version.model.name}@{version.number}")
    else:
        block = int(hyper.get("context", SCRATCH_DEFAULTS["context"]))
        sink.stage("building the model: chargpt from scratch")
    corpus = load_corpus(train_path)
    tokens = sum(len(d) + 2 for d in corpus.train)
    cfg, capped = train_config(hyper, fine_tune=base is not None, train_tokens=tokens, block=block, seed=job.seed,
                               max_steps_limit=settings.max_job_steps)
    if capped:
        sink.stage(f"training: the step count was capped at {cfg.max_steps} (ATELIER_MAX_JOB_STEPS)")
    model_cfg = {"n_positions": block, "n_embd": int(hyper.get("n_embd", SCRATCH_DEFAULTS["n_embd"])),
                 "n_layer": int(hyper.get("n_layer", SCRATCH_DEFAULTS["n_layer"])),
                 "n_head": int(hyper.get("n_head", SCRATCH_DEFAULTS["n_head"]))}
    if model_cfg["n_embd"] % model_cfg["n_head"]:
        raise JobError("hyperparameters.n_embd must be divisible by n_head", param="hyperparameters.n_embd")
    # 4. train
    folder = train_chargpt(train_path, workdir / "train", model_cfg, cfg,
                           min_count=int(hyper.get("min_count", 1)), on_event=sink, base=base, val_data=val_path,
                           should_stop=should_stop)
    if should_stop():
        return None
    with sessions() as db:
        db.get(Job, job.id).trained_tokens = cfg.max_steps * cfg.batch_size * block
        db.commit()
    return folder


def _train_image_model(job, settings, sessions, blobs, train_path, workdir, sink, should_stop):
    """ddpm / dcgan on an uploaded .npz (images, optional names as captions): from scratch, or
    fine-tuning a registered version (its architecture, vocabulary and weights; an upscaler it
    carries comes along into the new version)."""
    from atelier.models import upscaler
    from atelier.common.files import atomic_write_json
    from atelier.training.image_trainer import ImageTrainConfig, ImageTrainer

    h = {k: v for k, v in job.hyperparameters.items() if v != "auto"}
    steps = min(int(h.get("max_steps", 500)), settings.max_job_steps)
    base = None
    if job.base_model not in FAMILIES:
        with sessions() as db:
            version = resolve(db, ref=job.base_model)
            base = version_folder(blobs, version, settings.home_dir / "versions")
        sink.stage(f"building the model: fine-tuning {version.model.name}@{version.number}")
    else:
        sink.stage(f"building the model: {job.family} from scratch")
    # Fine-tuning starts from trained weights: a gentler rate, so the base's drawing survives.
    base_lr = {"ddpm": 8e-4, "dcgan": 2e-4}[job.family] / (4 if base else 1)
    cfg = ImageTrainConfig(family=job.family, max_steps=steps, batch_size=int(h.get("batch_size", 16)),
                           lr=base_lr * float(h.get("learning_rate_multiplier", 1.0)),
                           warmup_steps=int(h.get("warmup_steps", min(100, steps // 10))),
                           eval_every=int(h.get("eval_every", max(1, steps // 5))),
                           grad_clip=float(h.get("grad_clip", 1.0)), seed=job.seed)
    try:
        trainer = ImageTrainer(cfg, workdir / "train", data=train_path, init_from=base, on_event=sink)
    except ValueError as e:
        raise JobError(str(e), code="invalid_training_file", param="training_file") from None
    trainer.should_stop = should_stop
    trainer.fit()
    if should_stop():
        return None
    atomic_write_json(trainer.best_dir / "training.json", trainer.record())
    if base is not None and upscaler.available(base):
        for name in (upscaler.CONFIG_FILE, upscaler.WEIGHTS_FILE):
            shutil.copyfile(base / name, trainer.best_dir / name)
    return trainer.best_dir


def _train_tabular(job, settings, sessions, blobs, train_path, val_path, workdir, sink):
    """A pipeline trained on the table, or (hyperparameters.fuse) a fusion of trained versions."""
    from atelier.training.tabular import TabularError, fuse, train_tabular

    hyper = dict(job.hyperparameters)
    try:
        if "fuse" not in hyper:
            sink.stage("building the model: sklearn pipeline")
            return train_tabular(train_path, hyper | {"seed": job.seed}, workdir / "train", on_event=sink,
                                 validation_path=val_path)
        spec = hyper.pop("fuse")
        refs = spec.get("members", []) if isinstance(spec, dict) else []
        folders = []
        with sessions() as db:
            for ref in refs:
                try:
                    version = resolve(db, ref=ref)
                except (LookupError, ValueError) as e:
                    raise JobError(f"fusion member {ref!r}: {e}", param="hyperparameters.fuse.members") from None
                if version.model.family != "sklearn":
                    raise JobError(f"fusion member {ref!r} is a {version.model.family} model, not sklearn",
                                   param="hyperparameters.fuse.members")
                folders.append(version_folder(blobs, version, settings.home_dir / "versions"))
        sink.stage(f"building the model: {spec.get('method', 'voting')} fusion of {', '.join(refs)}")
        extra = {k: spec[k] for k in ("weights", "cv") if k in spec}
        return fuse(folders, spec.get("method", "voting"), train_path, hyper | extra | {"members": refs,
                                                                                        "seed": job.seed},
                    workdir / "train", on_event=sink)
    except TabularError as e:
        param = e.param if e.param in (None, "training_file", "validation_file") else f"hyperparameters.{e.param}"
        raise JobError(str(e), param=param) from None


def _register(job: Job, sessions, blobs: BlobStore, folder: Path) -> None:
    import json

    record = {}
    if (folder / "training.json").exists():
        record = json.loads((folder / "training.json").read_text(encoding="utf-8"))
    lineage = {"job_id": job.id, "base_model": job.base_model, "training_file": job.training_file,
               "validation_file": job.validation_file, "hyperparameters": job.hyperparameters, "seed": job.seed}
    with sessions() as db:
        if job.base_model in FAMILIES:  # from scratch: a new model named by the suffix
            name, family = job.suffix, job.family
            task = {"chargpt": "text-generation", "ddpm": "image-generation",
                    "dcgan": "image-generation"}.get(family) or record.get("task", "regression")
            v = register_version(db, blobs, name=name, family=family, task=task, folder=folder,
                                 metrics=record.get("metrics", {}), training=record | {"lineage": lineage})
            fine_tuned = f"{name}@{v.number}"
        else:  # fine-tuning: a new version of the base model under the alias ft-<suffix>
            base = resolve(db, ref=job.base_model)
            alias = f"ft-{job.suffix or job.id[-8:]}"
            v = register_version(db, blobs, name=base.model.name, family=base.model.family, task=base.model.task,
                                 folder=folder, metrics=record.get("metrics", {}),
                                 training=record | {"lineage": lineage | {"base_version": base.number}}, aliases=())
            set_alias(db, model=get_model(db, name=base.model.name), alias=alias, number=v.number)
            db.commit()
            fine_tuned = f"{base.model.name}:{alias}"
        audit.record(db, action="model.register", target=f"{v.model.name}@{v.number}", key_id=job.key_id,
                     detail={"job_id": job.id})
        store.finish(db, job, "succeeded", fine_tuned_model=fine_tuned)
        store.add_event(db, job.id, f"new version {v.model.name}@{v.number} registered as {fine_tuned}",
                        data={"version": f"{v.model.name}@{v.number}", "fine_tuned_model": fine_tuned})
