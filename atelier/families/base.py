"""The family contract: what a model family tells the server, and the hooks it implements.

In the spirit of LitServe's four hooks, a family is one object (one file under
atelier/families/, one line in the registry in atelier/families/__init__.py) with:

  declares   name, task, engine, train_formats, shipped folders, describe() for /v1/models
  1. load    a version folder → the *servable*: the model ready to serve
  2. work    the servable turns a request into work, runs a batch, encodes results; which
             methods it has depends on the engine that drives it (below)
  3. train   check_hyperparameters() at job creation, train() as the job's steps 3–4

The engines live in atelier/runtime/ and never import a family's internals:
  "text"   continuous batching (runtime/text_engine.py) over a TextServable
  "image"  micro-batching (runtime/image_engine.py) over an ImageServable
  "call"   no batching: the route calls the servable's own method in a worker thread
  None     not served on its own (the upscaler travels inside an image model's version)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from atelier.training.hyperparameters import TrainError

WEIGHT_SUFFIXES = (".safetensors", ".skops", ".onnx")
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MANIFEST = "atelier.json"


def manifest(folder: Path) -> dict:
    """The folder's atelier.json ({} without one); ValueError when it is not a JSON object. What each
    key may hold is checked by its reader (the importer, the family)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(found, dict):
        raise ValueError(f"{MANIFEST} must be a JSON object")
    return found


def refuse_pickles(folder: Path) -> None:
    """Pickle runs code when it loads: weights must be safetensors."""
    pickled = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.suffix in PICKLED)
    if pickled:
        raise ValueError(f"{', '.join(pickled)}: pickle-based weights are refused (loading them can run code). "
                         "Convert to safetensors: model.save_pretrained(folder, safe_serialization=True), or "
                         "`python -c \"from safetensors.torch import save_file; import torch; "
                         "save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"`")


@dataclass
class TrainJob:
    """What the job runner hands a family's `train` hook (steps 3 and 4 of a job)."""

    hyperparameters: dict
    seed: int
    train_path: Path
    val_path: Path | None
    workdir: Path
    max_steps: int  # ATELIER_MAX_JOB_STEPS
    on_event: Callable[[dict], None]  # trainer events → job events
    stage: Callable[[str], None]  # one line in the job's events ("building the model: …")
    should_stop: Callable[[], bool]  # cancelled, or the worker is shutting down
    base: Path | None = None  # fine-tuning: the base version's folder
    base_ref: str | None = None  # …and its name@number
    base_config: dict = field(default_factory=dict)
    version_folder: Callable[[str], tuple[Any, Path]] | None = None  # another version (e.g. fusion members)
    trained_tokens: int | None = None  # set by the hook, recorded on the job


def decoder_context(job: TrainJob, default: int, family: str) -> int:
    """A decoder job's context length: the base version's when fine-tuning, else the job's (or `default`);
    the job's events say which model is being built."""
    if job.base is not None:
        job.stage(f"building the model: fine-tuning {job.base_ref}")
        return job.base_config.get("n_positions")
    job.stage(f"building the model: {family} from scratch")
    return int(job.hyperparameters.get("context", default))


class TextServable(Protocol):
    """A language model as the text engine drives it. Token ids in, logits out."""

    context: int  # positions per sequence, prompt included
    eos_ids: list[int]  # any of them ends a sequence
    banned_ids: list[int]  # never sampled (padding, unknown, …)
    # optional: token_pieces: list[str], each token's text when it never depends on its neighbours (chargpt)

    def encode(self, text: str, chat: bool = False) -> list[int]: ...  # 1. request → work (chat: rendered template)
    def chat_prompt(self, messages: list[dict]) -> str: ...  # [{"role", "content"}] → the prompt, as text
    def new_cache(self, rows: int, dtype=None) -> Any: ...  # a KV cache with one row per sequence slot,
    #    holding what the model computes in (None) or float16 (the text engine's kv_dtype)
    def forward(self, ids, cache, rows, pos, last=None): ...  # 2. (B, T) ids at positions pos → (B, T, vocab) logits;
    #    with last (B,): (B, vocab), row b's token last[b] only (a prefill wants its prompts' last tokens)
    def decode(self, ids: list[int]) -> str: ...  # 3. result → text (the engine streams whole characters)
    def token_text(self, token: int) -> str: ...  # one token's text, for logprobs


class ImageServable(Protocol):
    """An image model as the image engine drives it."""

    sizes: list[str]  # served sizes, native first
    upscalers: list[str]  # how it enlarges, the default first
    sampler: str  # A1111's name for it ("DDIM", "DCGAN")
    multi_step: bool  # steps / guidance / negative prompts / previews apply
    stepwise: bool  # it has start / denoise / images: requests join a batch already running, at its next step

    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: list[float],
                 negative_prompts: list[str], on_step: Callable[[int, Any], None] | None) -> np.ndarray: ...
    # stepwise only: one image's sampling state; one step of many (each its x̂_0); finished ones' (B, S, S, 3) uint8
    def start(self, prompt: str, seed: int, *, steps: int, guidance: float, negative_prompt: str) -> Any: ...
    def denoise(self, samples: list) -> list: ...
    def images(self, samples: list) -> np.ndarray: ...
    def preview(self, x0) -> np.ndarray: ...  # an intermediate estimate (stepwise: a list of denoise's) → (B, S, S, 3) uint8
    def enlarge(self, image: np.ndarray, factor: int, method: str | None) -> np.ndarray: ...
    def prompt_words(self, prompt: str) -> list[dict]: ...  # [{word, known, instead}]: what the prompt helper shows


class Family:
    """Subclass per family; override what differs. Instances are stateless and shared."""

    name: str = ""
    task: str = ""
    engine: str | None = "call"
    train_formats: tuple[str, ...] = ()  # upload formats its jobs train from; () = no jobs
    fine_tunable: bool = False  # a job may start from one of its versions
    shipped: tuple[str, ...] = ()  # folders under atelier/assets/models registered on start
    quantizable: bool = False  # its versions may be quantized to int8 (atelier/training/compress.py)

    # -- declared --------------------------------------------------------------------------
    def task_of(self, config: dict) -> str:
        """The task of one version (a tabular version is classification or regression)."""
        return self.task

    def describe(self, config: dict, files: dict) -> dict:
        """Extra fields for /v1/models: what a caller needs to know to call this version."""
        return {}

    def import_facts(self, folder: Path) -> dict:
        """What `describe` will need that the version's config file lacks, read from an imported
        folder's files once, at import (e.g. a diffusers pipeline's native size)."""
        return {}

    def recognises(self, folder: Path) -> bool:
        """Whether an imported folder (`POST /api/models/import`, `atelier models import`) is one of this
        family's, by its files. Only families that load what users bring say yes to anything."""
        return False

    # -- 1. load ---------------------------------------------------------------------------
    def load(self, folder: Path) -> Any:
        raise NotImplementedError(f"{self.name} models are not served on their own")

    def weight_bytes(self, folder: Path) -> int:
        """What holding this version costs, for ATELIER_MAX_MODEL_MEMORY: its weight files' bytes."""
        return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)

    # -- 3. train --------------------------------------------------------------------------
    def check_hyperparameters(self, hyper: dict) -> dict:
        """Validate a job's hyper-parameters at creation; TrainError names the bad one."""
        raise TrainError(f"{self.name} models cannot be trained as jobs", param="model")

    def train(self, job: TrainJob) -> Path | None:
        """Build and train; the folder of the best weights (with training.json), or None if stopped."""
        raise TrainError(f"{self.name} models cannot be trained as jobs", param="model")
