"""Hyper-parameters a training job accepts, checked when the job is created.

OpenAI's three (`n_epochs`, `batch_size`, `learning_rate_multiplier`), then Atelier's own.
Each family says which it accepts (atelier/families/); a bad one is a TrainError naming it
and its range, which the API turns into a 400.
"""

from __future__ import annotations

import math

from atelier.training.trainer import TrainConfig


class TrainError(Exception):
    """A job that cannot run as asked: the message names the bad value (the job's error, or a 400)."""

    def __init__(self, message: str, code: str = "invalid_job", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


RANGES = {
    "n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-3, 10.0),
    "max_steps": (1, None), "warmup_steps": (0, 10_000), "eval_every": (1, 100_000),
    "early_stopping_patience": (1, 100), "grad_clip": (0.0, 100.0),
    "n_embd": (8, 1024), "n_layer": (1, 24), "n_head": (1, 32), "context": (8, 1024), "min_count": (1, 1000),
    # compression jobs (atelier/training/compress.py): the share of MLP channels a pruned model keeps, and
    # distillation's softening temperature and the weight of its KL term
    "keep": (0.05, 1.0), "temperature": (0.5, 10.0), "alpha": (0.0, 1.0),
}
CHOICES = {"optimizer": ("adamw", "sgd"), "schedule": ("cosine", "linear", "constant"),
           "precision": ("fp32", "bf16"), "method": ("supervised", "distill", "prune")}
REAL = ("learning_rate_multiplier", "grad_clip", "keep", "temperature", "alpha")  # the rest are whole numbers
COMPRESSION = ("method", "keep", "temperature", "alpha")  # only the families that compress accept these
WITH_COMPRESSION = tuple(sorted([*RANGES, *CHOICES]))
# The image families (ddpm, dcgan) keep their architecture: only the optimisation is set.
IMAGE_ACCEPTED = ("max_steps", "batch_size", "learning_rate_multiplier", "eval_every", "warmup_steps", "grad_clip")


def check(hyper: dict, accepted: tuple[str, ...] | None = None, *, family: str = "") -> dict:
    """Validate names, ranges and choices ("auto" leaves a default); `accepted` narrows the names."""
    allowed = accepted or tuple(sorted(n for n in [*RANGES, *CHOICES] if n not in COMPRESSION))
    out = {}
    for name, value in hyper.items():
        if name not in allowed:
            raise TrainError(f"unknown hyper-parameter {name!r}{' for ' + family if family else ''}; accepted: "
                             f"{', '.join(allowed)}", param="hyperparameters")
        if value == "auto":
            continue
        if name in CHOICES:
            if value not in CHOICES[name]:
                raise TrainError(f"hyperparameters.{name}={value!r} is not one of {', '.join(CHOICES[name])}",
                                 param=f"hyperparameters.{name}")
        else:
            lo, hi = RANGES[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= lo and \
                (hi is None or value <= hi)
            if ok and name not in REAL and not float(value).is_integer():
                ok = False
            if not ok:
                raise TrainError(f"hyperparameters.{name}={value!r} must be a number in [{lo}, {hi or '∞'}]",
                                 param=f"hyperparameters.{name}")
        out[name] = value
    return out


def given(hyper: dict) -> dict:
    """The hyper-parameters that were set (not "auto")."""
    return {k: v for k, v in hyper.items() if v != "auto"}


def train_config(hyper: dict, *, fine_tune: bool, train_tokens: int, block: int, seed: int, max_steps_limit: int
                 ) -> tuple[TrainConfig, bool]:
    """A language model's hyper-parameters → TrainConfig; also whether the step count was capped."""
    h = given(hyper)
    batch = int(h.get("batch_size", 8 if fine_tune else 16))
    lr = (3e-4 if fine_tune else 2e-3) * float(h.get("learning_rate_multiplier", 1.0))
    epochs = int(h.get("n_epochs", 3))
    steps = int(h.get("max_steps", max(1, math.ceil(epochs * train_tokens / (batch * block)))))
    capped = steps > max_steps_limit
    steps = min(steps, max_steps_limit)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, lr=lr,
                      warmup_steps=int(h.get("warmup_steps", min(20, steps // 10))),
                      schedule=h.get("schedule", "cosine"), optimizer=h.get("optimizer", "adamw"),
                      precision=h.get("precision", "fp32"), grad_clip=float(h.get("grad_clip", 1.0)),
                      eval_every=int(h.get("eval_every", max(1, steps // 10))),
                      patience=int(h.get("early_stopping_patience", 5)), log_every=max(1, min(10, steps // 20)),
                      eval_batches=4, seed=seed)
    return cfg, capped


def decoder_plan(hyper: dict, *, block: int, fine_tune: bool, train_tokens: int, seed: int, max_steps_limit: int,
                 defaults: dict, stage) -> tuple[dict, TrainConfig]:
    """A chargpt-style decoder job's model shape (the base's when fine-tuning is the caller's) and its
    TrainConfig; a capped step count is said with `stage`; TrainError when the heads do not divide the width."""
    cfg, capped = train_config(hyper, fine_tune=fine_tune, train_tokens=train_tokens, block=block, seed=seed,
                               max_steps_limit=max_steps_limit)
    if capped:
        stage(f"training: the step count was capped at {cfg.max_steps} (ATELIER_MAX_JOB_STEPS)")
    model_cfg = {"n_positions": block, **{k: int(hyper.get(k, defaults[k])) for k in ("n_embd", "n_layer", "n_head")}}
    if model_cfg["n_embd"] % model_cfg["n_head"]:
        raise TrainError("hyperparameters.n_embd must be divisible by n_head", param="hyperparameters.n_embd")
    return model_cfg, cfg
