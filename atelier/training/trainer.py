"""The training loop for chargpt: batches, optimiser, schedule, evaluation, checkpoints.

Phases of `Trainer.fit`:
  1. encode the corpus into one token stream per split (<bos> doc <eos> ...)
  2. resume from the last checkpoint in `workdir`, if there is one
  3. loop: sample windows → forward (optionally under bf16 autocast) → clip → step
  4. every `eval_every` steps: validation loss, keep the best weights, checkpoint, early stop

Everything on disk is safetensors or JSON; the optimiser state too (no pickle). Batches
are drawn from a generator seeded by (seed, step), so a resumed run sees the same batches
as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from atelier.models.chargpt import CharGPT, load_state, save_pretrained, hf_state_dict
from atelier.models.tokenizer import CharTokenizer
from atelier.common.files import atomic_write_json
from atelier.training.corpus import Corpus

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_every: int = 200
    eval_batches: int = 16
    patience: int = 5  # evaluations without improvement before stopping early
    log_every: int = 10
    seed: int = 1337
    max_minutes: float | None = None  # stop (with a final eval) after this much wall time
    # Distillation (a Trainer given a teacher): loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE,
    # both distributions softened by the temperature T (Hinton et al., 2015).
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def __post_init__(self):
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES),
                                     ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be at least 1")
        if not (0 < self.lr <= 1):
            raise ValueError(f"lr={self.lr} must be in (0, 1]")


@dataclass
class TrainState:
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)  # eval records
    stopped_early: bool = False


def encode_stream(docs: list[str], tok: CharTokenizer) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.append(tok.bos_id)
        ids.extend(tok.encode(d))
        ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def environment(started: float) -> dict:
    """Where a run happened, for its training.json."""
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "wall_seconds_this_run": round(time.time() - started, 1)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: CharGPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only, not on biases and LayerNorm gains (as in nanoGPT).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (everything else)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    save_file(tensors, str(path.with_suffix(".safetensors")))
    atomic_write_json(path.with_suffix(".json"), {"scalars": scalars, "param_groups": groups})


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def publish_checkpoint(workdir: Path, folder: Path, step: int, on_event: Callable[[dict], None]) -> None:
    """Make a fully written checkpoint folder the one to resume from, then drop older ones.

    `latest.json` flips atomically, so a crash at any point leaves a complete checkpoint.
    """
    atomic_write_json(workdir / "latest.json", {"checkpoint": folder.name, "step": step})
    for old in workdir.glob("checkpoint-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    on_event({"type": "checkpoint", "step": step, "path": str(folder)})


class Trainer:
    """Train a CharGPT on a corpus, checkpointing into workdir.

    >>> Trainer(model, tok, corpus, TrainConfig(max_steps=500), "runs/poet").fit()
    """

    def __init__(self, model: CharGPT, tokenizer: CharTokenizer, corpus: Corpus, cfg: TrainConfig,
                 workdir: str | Path, on_event: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, teacher: CharGPT | None = None):
        self.model, self.tok, self.corpus, self.cfg = model, tokenizer, corpus, cfg
        self.teacher = teacher.eval() if teacher is not None else None  # distil from its outputs
        self.workdir = Path(workdir)
        self.on_event = on_event or (lambda e: None)
        self.block = model.config.n_positions
        self.state = TrainState()
        self.should_stop = should_stop or (lambda: False)  # a job runner cancels through it

    # -- data ---------------------------------------------------------------------------
    def _streams(self):
        return (self._at_least_one_window(encode_stream(self.corpus.train, self.tok)),
                self._at_least_one_window(encode_stream(self.corpus.val, self.tok)))

    def _at_least_one_window(self, stream: torch.Tensor) -> torch.Tensor:
        # Tiny corpora: repeat the stream so that one training window fits.
        if len(stream) > self.block + 1:
            return stream
        return stream.repeat((self.block + 2) // len(stream) + 1)

    def _batch(self, stream: torch.Tensor, step: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        starts = torch.randint(0, len(stream) - self.block - 1, (self.cfg.batch_size,), generator=g)
        idx = torch.stack([stream[s : s + self.block + 1] for s in starts.tolist()])
        return idx[:, :-1], idx[:, 1:]

    @torch.no_grad()
    def evaluate(self, stream: torch.Tensor) -> float:
        """Mean loss over evenly spaced windows of the validation stream (deterministic)."""
        self.model.eval()
        n = self.cfg.eval_batches * self.cfg.batch_size
        last = len(stream) - self.block - 1
        starts = torch.linspace(0, last, steps=min(n, last + 1)).long().tolist()
        losses = []
        for i in range(0, len(starts), self.cfg.batch_size):
            chunk = starts[i : i + self.cfg.batch_size]
            idx = torch.stack([stream[s : s + self.block + 1] for s in chunk])
            with self._autocast():
                _, loss = self.model(idx[:, :-1], idx[:, 1:])
            losses.append(float(loss) * len(chunk))
        self.model.train()
        return sum(losses) / len(starts)

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    # -- checkpoints --------------------------------------------------------------------
    @property
    def best_dir(self) -> Path:
        return self.workdir / "best"

    def _checkpoint(self, opt):
        """checkpoint-<step>/ written in full, then `latest.json` flipped to it atomically."""
        step = self.state.step
        d = self.workdir / f"checkpoint-{step}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(hf_state_dict(self.model), str(d / "model.safetensors"))
        save_optimizer(opt, d / "optimizer")
        atomic_write_json(d / "state.json", {"state": asdict(self.state), "config": asdict(self.cfg)})
        publish_checkpoint(self.workdir, d, step, self.on_event)

    def _resume(self, opt) -> bool:
        pointer = self.workdir / "latest.json"
        if not pointer.exists():
            return False
        d = self.workdir / json.loads(pointer.read_text())["checkpoint"]
        load_state(self.model, load_file(str(d / "model.safetensors")))
        load_optimizer(opt, d / "optimizer")
        saved = json.loads((d / "state.json").read_text())["state"]
        self.state = TrainState(**saved)
        self.on_event({"type": "resumed", "step": self.state.step, "path": str(d)})
        return True

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainState:
        cfg, model = self.cfg, self.model
        # 1. data
        train, val = self._streams()
        self.workdir.mkdir(parents=True, exist_ok=True)
        opt = make_optimizer(model, cfg)
        # 2. resume
        self._resume(opt)
        model.train()
        started = time.time()
        window_t, window_tokens = time.time(), 0
        self.on_event({"type": "start", "step": self.state.step, "max_steps": cfg.max_steps,
                       "train_tokens": len(train), "val_tokens": len(val), "params": model.config.n_params})
        # 3. loop
        while self.state.step < cfg.max_steps and not self.state.stopped_early:
            if self.should_stop():  # cancelled, or the worker is shutting down: the checkpoint stays
                self.on_event({"type": "stopped", "step": self.state.step})
                return self.state
            step = self.state.step
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = self._batch(train, step)
            with self._autocast():
                loss = self._loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            self.state.step += 1
            self.state.tokens_seen += x.numel()
            window_tokens += x.numel()
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                now = time.time()
                self.on_event({"type": "train", "step": self.state.step, "max_steps": cfg.max_steps,
                               "loss": loss.item(), "lr": lr,
                               "tokens_per_s": window_tokens / max(now - window_t, 1e-9)})
                window_t, window_tokens = now, 0
            out_of_time = cfg.max_minutes is not None and (time.time() - started) / 60 >= cfg.max_minutes
            # 4. evaluate, keep the best, checkpoint, early stop
            if self.state.step % cfg.eval_every == 0 or self.state.step == cfg.max_steps or out_of_time:
                self._eval_and_checkpoint(val, opt)
            if out_of_time:
                self.on_event({"type": "time_limit", "step": self.state.step})
                break
        if not self.best_dir.exists():  # e.g. max_steps reached between evaluations on resume
            self._eval_and_checkpoint(val, opt)
        self.on_event({"type": "done", "step": self.state.step, "best_val_loss": self.state.best_val_loss,
                       "best_step": self.state.best_step, "stopped_early": self.state.stopped_early})
        return self.state

    def _loss(self, x, y) -> torch.Tensor:
        """Cross-entropy on the next character; with a teacher, mixed with the KL to its softened outputs."""
        logits, ce = self.model(x, y)
        if self.teacher is None:
            return ce
        with torch.no_grad():
            taught, _ = self.teacher(x)
        t, vocab = self.cfg.distill_temperature, logits.shape[-1]
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float().view(-1, vocab) / t, -1),
                                        torch.log_softmax(taught.float().view(-1, vocab) / t, -1),
                                        log_target=True, reduction="batchmean") * t * t
        return self.cfg.distill_alpha * kl + (1 - self.cfg.distill_alpha) * ce

    def _eval_and_checkpoint(self, val, opt):
        st = self.state
        val_loss = self.evaluate(val)
        improved = val_loss < st.best_val_loss - 1e-4
        record = {"step": st.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "tokens_seen": st.tokens_seen, "improved": improved}
        st.history.append(record)
        self.on_event({"type": "eval", **record})
        if improved:
            st.best_val_loss, st.best_step, st.bad_evals = val_loss, st.step, 0
            save_pretrained(self.model, self.tok, self.best_dir)
        else:
            st.bad_evals += 1
            if st.bad_evals >= self.cfg.patience:
                st.stopped_early = True
                self.on_event({"type": "early_stop", "step": st.step, "best_step": st.best_step})
        self._checkpoint(opt)
