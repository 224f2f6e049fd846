"""`atelier train`: train a model locally (or as a server job with --follow) and register it in the local registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from atelier.cli.http import KeyOpt, UrlOpt, _settings, call, console, err
from atelier.cli.jobs import _progress, _training_events, follow
from atelier.cli.keys import _local_db

# The families this command can train in-process. Other registered families (sklearn, gram) train
# only as server jobs or not at all; tests/test_cli.py checks that each is in the family registry.
LOCAL_TRAINERS = ("chargpt", "abc-gpt", "ddpm", "dcgan", "upscaler")
DECODERS = ("chargpt", "abc-gpt")  # the language-model trainers (text; ABC tunes)


def _family(name: str):
    """The registered family (imported here: the registry loads torch, which `atelier --help` need not)."""
    from atelier.families import get_family

    return get_family(name)


def train(data: Annotated[Path, typer.Option(help="chargpt: poetry folder (tang.jsonl + songci.jsonl), .txt or "
                                                  ".jsonl; abc-gpt: an .abc file or a folder of them; images: "
                                                  "the emoji folder or an .npz")],
          name: Annotated[str, typer.Option(help="model name to register the result under")],
          family: Annotated[str, typer.Option(help=" | ".join(LOCAL_TRAINERS))] = "chargpt",
          workdir: Annotated[Optional[Path], typer.Option(help="checkpoints; rerun to resume [runs/<name>]")] = None,
          context: Annotated[int, typer.Option(help="context length (characters)")] = 192,
          n_embd: Annotated[int, typer.Option()] = 192,
          n_layer: Annotated[int, typer.Option()] = 6,
          n_head: Annotated[int, typer.Option()] = 6,
          dropout: Annotated[float, typer.Option()] = 0.0,
          min_count: Annotated[int, typer.Option(help="drop characters seen fewer times (→ <unk>)")] = 1,
          steps: Annotated[int, typer.Option(help="maximum optimiser steps")] = 2000,
          batch_size: Annotated[int, typer.Option()] = 20,
          lr: Annotated[Optional[float], typer.Option(help="peak learning rate [chargpt 2e-3 (3e-4 with --base), "
                                                           "ddpm 8e-4, dcgan 2e-4, upscaler 1e-3]")] = None,
          optimizer: Annotated[str, typer.Option(help="adamw | sgd")] = "adamw",
          schedule: Annotated[str, typer.Option(help="cosine | linear | constant")] = "cosine",
          warmup: Annotated[int, typer.Option(help="warm-up steps")] = 100,
          grad_clip: Annotated[float, typer.Option(help="0 = off")] = 1.0,
          precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast)")] = "fp32",
          eval_every: Annotated[int, typer.Option()] = 200,
          patience: Annotated[int, typer.Option(help="evaluations without improvement before stopping")] = 4,
          max_minutes: Annotated[Optional[float], typer.Option(help="wall-time budget")] = None,
          seed: Annotated[int, typer.Option()] = 1337,
          threads: Annotated[Optional[int], typer.Option(help="torch threads")] = None,
          register: Annotated[bool, typer.Option(help="register the result in ATELIER_HOME")] = True,
          home: Annotated[Optional[Path], typer.Option(help="[ATELIER_HOME]")] = None,
          follow_job: Annotated[bool, typer.Option("--follow", help="run as a job on the server and follow it")] = False,
          base: Annotated[Optional[str], typer.Option(help="with --follow: fine-tune this model instead")] = None,
          base_channels: Annotated[int, typer.Option(help="ddpm: UNet width")] = 32,
          text_from: Annotated[Optional[Path], typer.Option(help="dcgan: a ddpm folder whose text encoder to reuse")] = None,
          attach_to: Annotated[Optional[str], typer.Option(help="upscaler: register a new version of this image "
                                                                "model (NAME or NAME@N) carrying it")] = None,
          url: UrlOpt = None, api_key: KeyOpt = None):
    """Train a model (progress bar, evaluation, checkpoints; rerun to resume) and register it.

    --family chargpt (text, early stopping), abc-gpt (folk tunes from .abc files, in all twelve
    keys), ddpm or dcgan (images), or upscaler (a ×2
    upscaler that --attach-to adds to an image model, which then serves twice its size).
    Locally by default; with --follow, the data is uploaded and trained by the server's
    job worker (from scratch, or fine-tuning --base), with this terminal following it.
    """
    if family not in LOCAL_TRAINERS:
        err.print(f"[red]--family {family!r} is not one of {', '.join(LOCAL_TRAINERS)}[/red]")
        raise typer.Exit(2)
    default_lr = {"chargpt": 3e-4 if base else 2e-3, "abc-gpt": 3e-4 if base else 2e-3, "ddpm": 8e-4, "dcgan": 2e-4,
                  "upscaler": 1e-3}[family]
    lr = lr or default_lr
    if follow_job:
        if data.is_dir() or family == "upscaler":
            err.print("[red]--follow uploads one file (.txt or .jsonl; .abc for abc-gpt; .npz for ddpm/dcgan) and "
                      "trains chargpt, abc-gpt, ddpm or dcgan[/red]")
            raise typer.Exit(2)
        # The job API takes a learning-rate multiplier (OpenAI's shape), relative to the family default.
        hyper = {"max_steps": steps, "batch_size": batch_size, "learning_rate_multiplier": lr / default_lr,
                 "eval_every": eval_every}
        if family in DECODERS:
            hyper |= {"optimizer": optimizer, "schedule": schedule, "warmup_steps": warmup, "grad_clip": grad_clip,
                      "precision": precision, "early_stopping_patience": patience}
            if not base:  # a fine-tune keeps its base's architecture
                hyper |= {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "context": context}
                hyper |= {"min_count": min_count} if family == "chargpt" else {}
        with open(data, "rb") as f:
            up = call("POST", "/v1/files", url, api_key, files={"file": (data.name, f)},
                      data={"purpose": "fine-tune"}).json()
        job = call("POST", "/v1/fine_tuning/jobs", url, api_key,
                   json={"model": base or family, "training_file": up["id"], "suffix": name,
                         "hyperparameters": hyper, "seed": seed}).json()
        console.print(f"job {job['id']} queued")
        done = follow(job["id"], _settings(url=url, api_key=api_key))
        raise typer.Exit(0 if done["status"] == "succeeded" else 1)
    if family not in DECODERS:
        _train_image_family(family, data=data, name=name, workdir=workdir or Path("runs") / name, steps=steps,
                            batch_size=batch_size, lr=lr, eval_every=eval_every, max_minutes=max_minutes, seed=seed,
                            threads=threads, base_channels=base_channels, text_from=text_from,
                            attach_to=attach_to, register=register, home=home)
        return
    from atelier.training.music import train_tunes
    from atelier.training.run import train_chargpt
    from atelier.training.trainer import TrainConfig

    try:
        cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
                          warmup_steps=warmup, grad_clip=grad_clip, precision=precision, eval_every=eval_every,
                          patience=patience, max_minutes=max_minutes, seed=seed)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    workdir = workdir or Path("runs") / name
    with (progress := _progress()):
        on_event = _training_events(progress, progress.add_task("training", total=steps, info=""))
        shape = dict(n_positions=context, n_embd=n_embd, n_layer=n_layer, n_head=n_head, dropout=dropout)
        if family == "abc-gpt":
            if threads:
                import torch

                torch.set_num_threads(threads)
            best = train_tunes(data, workdir, shape, cfg, on_event=on_event)
        else:
            best = train_chargpt(data, workdir, shape, cfg, min_count=min_count, threads=threads, on_event=on_event)
    record = json.loads((best / "training.json").read_text())
    console.print(f"best weights: {best}  val loss {record['metrics']['val_loss']:.4f}")
    if register:
        from atelier.storage.blobs import open_blobs
        from atelier.storage.registry import register_trained

        settings = _settings(home=home)
        with _local_db(home) as db:
            v = register_trained(db, open_blobs(settings), folder=best, name=name, family=family,
                                 task=_family(family).task, detail={"via": "cli"})
            console.print(f"registered {name}@{v.number} (alias latest) in {settings.home_dir}")


def _train_image_family(family: str, *, data: Path, name: str, workdir: Path, steps: int, batch_size: int, lr: float,
                        eval_every: int, max_minutes, seed: int, threads, base_channels: int, text_from, attach_to,
                        register: bool, home) -> None:
    """`atelier train --family ddpm|dcgan|upscaler`: the image trainers behind the same progress bar."""
    import torch

    from atelier.training.image_trainer import ImageTrainConfig, train_images
    from atelier.training.upscaler_trainer import UpscalerTrainConfig, train_upscaler

    if family == "upscaler" and register and not attach_to:
        err.print("[red]an upscaler is registered as part of an image model: pass --attach-to NAME "
                  "(or --no-register)[/red]")
        raise typer.Exit(2)
    try:
        if family == "upscaler":
            cfg = UpscalerTrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every,
                                      max_minutes=max_minutes, seed=seed)
        else:
            cfg = ImageTrainConfig(family=family, max_steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every,
                                   max_minutes=max_minutes, seed=seed, warmup_steps=200 if family == "ddpm" else 0)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    if threads:
        torch.set_num_threads(threads)
    with (progress := _progress()):
        on_event = _training_events(progress, progress.add_task(f"training {family}", total=steps, info=""))
        if family == "upscaler":
            best = train_upscaler(cfg, workdir, data=data, on_event=on_event)
        else:
            best = train_images(cfg, workdir, data=data, model_cfg={"base_channels": base_channels} if family == "ddpm"
                                else {}, text_from=text_from, on_event=on_event)
    # An upscaler's record has its own name so it can sit next to the image model's training.json.
    record_file = best / ("upscaler-training.json" if family == "upscaler" else "training.json")
    record = json.loads(record_file.read_text())
    console.print(f"best weights: {best}  metrics {record['metrics']}")
    if not register:
        return
    from atelier.storage.blobs import open_blobs
    from atelier.storage.registry import register_trained

    settings = _settings(home=home)
    blobs = open_blobs(settings)
    detail = {"via": "cli", "family": family}
    with _local_db(home) as db:
        if family == "upscaler":
            v = _attach_upscaler(db, blobs, settings, best=best, record=record, attach_to=attach_to, detail=detail)
        else:
            v = register_trained(db, blobs, folder=best, name=name, family=family, task=_family(family).task,
                                 detail=detail)
        console.print(f"registered {v.model.name}@{v.number} (alias latest) in {settings.home_dir}")


def _attach_upscaler(db, blobs, settings, *, best: Path, record: dict, attach_to: str, detail: dict):
    """A new version of the image model `attach_to`: its files plus the upscaler's, its metrics unchanged."""
    import shutil
    import tempfile

    from atelier.storage.registry import register_trained, resolve, version_folder

    try:
        base_v = resolve(db, ref=attach_to)
    except Exception as e:  # noqa: BLE001 — NotFound / bad reference: say which
        err.print(f"[red]--attach-to {attach_to}: {e}[/red]")
        raise typer.Exit(2)
    if base_v.model.task != "image-generation":
        err.print(f"[red]--attach-to {attach_to}: a {base_v.model.family} model does not make images[/red]")
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        src = version_folder(blobs, base_v, settings.home_dir / "versions")
        for f in src.iterdir():
            shutil.copyfile(f, Path(tmp) / f.name)
        for f in best.iterdir():
            shutil.copyfile(f, Path(tmp) / f.name)
        # register_trained takes the version's metrics from training.json. The base's copy normally
        # carries them already (and is then left byte-identical); when it is missing or disagrees with
        # the base version's metrics, rewrite it so the new version keeps the base's metrics.
        tj = Path(tmp) / "training.json"
        on_file = json.loads(tj.read_text(encoding="utf-8")) if tj.exists() else None
        if (on_file or {}).get("metrics", {}) != base_v.metrics:
            tj.write_text(json.dumps((on_file or base_v.training) | {"metrics": base_v.metrics}), encoding="utf-8")
        return register_trained(db, blobs, folder=Path(tmp), name=base_v.model.name, family=base_v.model.family,
                                task=base_v.model.task, training=base_v.training | {"upscaler": record}, detail=detail)
