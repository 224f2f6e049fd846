"""Training the image families (ddpm, dcgan) on the emoji set, with checkpoints and resume.

Phases of `train_images`:
  1. data: base designs only, split by design (atelier/training/image_data.py); vocabulary
     from the training names (kept in workdir, so a resumed run keeps it)
  2. model, optimiser(s) and an exponential moving average (EMA) of the weights that are
     sampled from; resume from `latest.json` when the workdir has a checkpoint
  3. loop: ddpm — one noise-prediction step; dcgan — one discriminator and one generator
     step (hinge loss); batches from a generator seeded by (seed, step), so a resumed run
     sees the same batches as an uninterrupted one
  4. every `eval_every` steps: evaluate (ddpm: held-out diffusion loss at fixed t and noise;
     dcgan: held-out discriminator margin), write the EMA weights to `best/` when better
     (ddpm) or always (dcgan, where a loss does not rank generators), checkpoint

Events go to `on_event(dict)` like atelier/training/trainer.py: start, resumed, train,
eval, checkpoint, time_limit, done. Everything on disk is safetensors or JSON.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from atelier.models import dcgan, ddpm
from atelier.models.ddim import DDIMScheduler
from atelier.models.text_encoder import VOCAB_FILE, WordVocab, words
from atelier.common.files import atomic_write_json
from atelier.training.image_data import EmojiSet, load_images, sample_batch, to_tensor
from atelier.training.trainer import load_optimizer, publish_checkpoint, save_optimizer

FAMILIES = ("ddpm", "dcgan")


@dataclass
class ImageTrainConfig:
    family: str = "ddpm"
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    eval_every: int = 250
    log_every: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None
    val_fraction: float = 0.08

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be at least 1")
        if not (0 < self.lr <= 1):
            raise ValueError(f"lr={self.lr} must be in (0, 1]")
        if not (0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")


@dataclass
class ImageTrainState:
    step: int = 0
    images_seen: int = 0
    best_val: float = math.inf
    best_step: int = 0
    history: list[dict] = field(default_factory=list)


class ImageTrainer:
    """Train one image model in `workdir`; rerun the same call to resume.

    >>> ImageTrainer(ImageTrainConfig(family="ddpm", max_steps=2000), "runs/emoji-diffusion",
    ...              data="../shared/data/images/emoji64").fit()
    """

    def __init__(self, cfg: ImageTrainConfig, workdir: str | Path, *, data: str | Path, model_cfg: dict | None = None,
                 text_from: str | Path | None = None, init_from: str | Path | None = None,
                 on_event: Callable[[dict], None] | None = None):
        self.cfg, self.workdir = cfg, Path(workdir)
        self.on_event = on_event or (lambda e: None)
        self.should_stop = lambda: False  # a job runner can set this to cancel
        torch.manual_seed(cfg.seed)
        # 1. data and vocabulary (fine-tuning keeps the base model's: its text encoder knows those words)
        self.train_set, self.val_set, self.provenance = load_images(data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.workdir.mkdir(parents=True, exist_ok=True)
        vocab_path = self.workdir / VOCAB_FILE
        source = init_from if init_from is not None else text_from
        if source is not None:
            self.vocab = WordVocab.load(Path(source) / VOCAB_FILE)
        elif vocab_path.exists():
            self.vocab = WordVocab.load(vocab_path)
        else:
            self.vocab = WordVocab.build(self.train_set.names)
        self.vocab.save(vocab_path)
        # 2. model, EMA copy, optimisers
        base = None
        if init_from is not None:  # the base version's architecture and weights, whatever model_cfg says
            # (its loader checks the weights against the config; a dcgan gets a fresh discriminator)
            base = (ddpm if cfg.family == "ddpm" else dcgan).from_pretrained(init_from)[0].train()
        model_cfg = dict(model_cfg or {}, vocab_size=len(self.vocab))
        if cfg.family == "ddpm":
            self.model = base if base is not None else ddpm.EmojiDiffusion(ddpm.DdpmConfig(**model_cfg))
            self.scheduler = DDIMScheduler(self.model.config.num_train_timesteps, self.model.config.beta_schedule,
                                           prediction_type=self.model.config.prediction_type)
            self.opts = {"model": torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)}
        else:
            self.model = base if base is not None else dcgan.EmojiGAN(dcgan.DcganConfig(**model_cfg))
            if text_from is not None:
                state = load_file(Path(text_from) / "model.safetensors")
                self.model.text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
            self.model.text.requires_grad_(False)
            self.opts = {"generator": torch.optim.Adam(self.model.generator.parameters(), lr=cfg.lr, betas=(0.0, 0.9)),
                         "discriminator": torch.optim.Adam(self.model.discriminator.parameters(), lr=cfg.lr * 2,
                                                           betas=(0.0, 0.9))}
        if base is not None:
            unknown = self._unknown_words()
            self.on_event({"type": "init", "from": str(init_from), "unknown_caption_words": unknown,
                           "message": f"starting from the base weights ({len(self.vocab)} known words)" +
                           (f"; caption words it cannot read, ignored: {', '.join(unknown)}" if unknown else "")})
        self.text_from = str(text_from) if text_from else None
        self.init_from = str(init_from) if init_from else None
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.state = ImageTrainState()

    @property
    def best_dir(self) -> Path:
        return self.workdir / "best"

    def _lr(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    @torch.no_grad()
    def _update_ema(self) -> None:
        # A short warm-up of the decay, so early checkpoints are not dominated by the random init.
        d = min(self.cfg.ema_decay, (1 + self.state.step) / (10 + self.state.step))
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}  # dcgan's text encoder
        current = self.model.state_dict()
        for name, e in self.ema.state_dict().items():
            if e.dtype.is_floating_point and name not in frozen:
                e.mul_(d).add_(current[name], alpha=1 - d)
            else:
                e.copy_(current[name])

    def _unknown_words(self) -> list[str]:
        """Caption words the (base) vocabulary lacks: the text encoder cannot read them."""
        seen = {w for name in self.train_set.names for w in words(name)}
        return sorted(w for w in seen if not self.vocab.known(w))[:50]

    # -- one step of each family --------------------------------------------------------
    def _ddpm_step(self, x, ids, g) -> dict:
        opt = self.opts["model"]
        loss = ddpm.diffusion_loss(self.model, self.scheduler, x, ids, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        opt.step()
        return {"loss": loss.item()}

    def _gan_step(self, x, ids, g) -> dict:
        m, c = self.model, self.model.config
        with torch.no_grad():
            text = m.text(ids)
        z = torch.randn(x.shape[0], c.z_dim, generator=g)
        # 1. discriminator: real images with their names high, generated ones low
        fake = m.generator(z, text)
        d_loss = dcgan.d_hinge_loss(m.discriminator(x, text), m.discriminator(fake.detach(), text))
        self.opts["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        self.opts["discriminator"].step()
        # 2. generator: fool the discriminator
        g_loss = dcgan.g_hinge_loss(m.discriminator(fake, text))
        self.opts["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        self.opts["generator"].step()
        return {"loss": float(g_loss), "d_loss": float(d_loss)}

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Deterministic held-out score (lower is better for ddpm)."""
        val, c = self.val_set, self.ema.config
        x = to_tensor(val.images)
        ids = self.vocab.batch(val.names, c.max_words)
        g = torch.Generator().manual_seed(12345)
        if self.cfg.family == "ddpm":
            losses = []
            for t in (50, 250, 500, 750, 950):  # fixed timesteps and noise: comparable across evaluations
                noise = torch.randn(x.shape, generator=g)
                tt = torch.full((len(x),), t)
                pred = self.ema(self.scheduler.add_noise(x, noise, tt), tt, ids)
                losses.append(float(torch.nn.functional.mse_loss(pred, self.scheduler.target(x, noise, tt))))
            return sum(losses) / len(losses)
        # dcgan: how far the discriminator separates held-out real images from samples
        text = self.ema.text(ids)
        fake = self.ema.generator(torch.randn(len(x), c.z_dim, generator=g), text)
        d = self.model.discriminator.eval()
        margin = float(d(x, text).mean() - d(fake, text).mean())
        d.train()
        return margin

    # -- checkpoints --------------------------------------------------------------------
    def _save_best(self) -> None:
        save = ddpm.save_pretrained if self.cfg.family == "ddpm" else dcgan.save_pretrained
        tmp = self.workdir / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(self.ema, self.vocab, tmp)
        shutil.rmtree(self.best_dir, ignore_errors=True)
        tmp.rename(self.best_dir)

    def _checkpoint(self) -> None:
        step = self.state.step
        d = self.workdir / f"checkpoint-{step}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(d / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in self.ema.state_dict().items()}, str(d / "ema.safetensors"))
        for name, opt in self.opts.items():
            save_optimizer(opt, d / f"optimizer-{name}")
        atomic_write_json(d / "state.json", {"state": asdict(self.state), "config": asdict(self.cfg)})
        publish_checkpoint(self.workdir, d, step, self.on_event)

    def _resume(self) -> bool:
        pointer = self.workdir / "latest.json"
        if not pointer.exists():
            return False
        d = self.workdir / json.loads(pointer.read_text())["checkpoint"]
        self.model.load_state_dict(load_file(str(d / "model.safetensors")))
        self.ema.load_state_dict(load_file(str(d / "ema.safetensors")))
        for name, opt in self.opts.items():
            load_optimizer(opt, d / f"optimizer-{name}")
        self.state = ImageTrainState(**json.loads((d / "state.json").read_text())["state"])
        self.on_event({"type": "resumed", "step": self.state.step, "path": str(d)})
        return True

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> ImageTrainState:
        cfg, st = self.cfg, self.state
        self._resume()
        st = self.state
        self.model.train()
        started = window_t = time.time()
        window_images = 0
        self.on_event({"type": "start", "family": cfg.family, "step": st.step, "max_steps": cfg.max_steps,
                       "train_images": len(self.train_set), "val_images": len(self.val_set),
                       "params": self.ema.n_params})
        while st.step < cfg.max_steps:
            if self.should_stop():
                self.on_event({"type": "cancelled", "step": st.step})
                break
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
            x, ids = sample_batch(self.train_set, self.vocab, cfg.batch_size, g, max_words=self.model.config.max_words)
            lr = self._lr(st.step)
            for name, opt in self.opts.items():
                for group in opt.param_groups:
                    group["lr"] = lr * (2 if name == "discriminator" else 1)
            out = self._ddpm_step(x, ids, g) if cfg.family == "ddpm" else self._gan_step(x, ids, g)
            st.step += 1
            st.images_seen += len(x)
            window_images += len(x)
            self._update_ema()
            if st.step % cfg.log_every == 0 or st.step == cfg.max_steps:
                now = time.time()
                self.on_event({"type": "train", "step": st.step, "max_steps": cfg.max_steps, "lr": lr, **out,
                               "images_per_s": window_images / max(now - window_t, 1e-9)})
                window_t, window_images = now, 0
            out_of_time = cfg.max_minutes is not None and (time.time() - started) / 60 >= cfg.max_minutes
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps or out_of_time:
                self._eval_and_checkpoint()
            if out_of_time:
                self.on_event({"type": "time_limit", "step": st.step})
                break
        if not self.best_dir.exists():
            self._eval_and_checkpoint()
        self.on_event({"type": "done", "step": st.step, "best_val": st.best_val, "best_step": st.best_step})
        return st

    def _eval_and_checkpoint(self) -> None:
        st = self.state
        score = self.evaluate()
        # ddpm: lower held-out loss is better. dcgan: the margin does not rank generators, keep the latest.
        improved = score < st.best_val - 1e-5 if self.cfg.family == "ddpm" else True
        record = {"step": st.step, "images_seen": st.images_seen,
                  ("val_loss" if self.cfg.family == "ddpm" else "val_d_margin"): score, "improved": improved}
        st.history.append(record)
        self.on_event({"type": "eval", **record})
        if improved:
            st.best_val, st.best_step = (score if self.cfg.family == "ddpm" else st.best_val), st.step
            self._save_best()
        self._checkpoint()

    def record(self) -> dict:
        """training.json: configs, data provenance, metrics, history (written next to the best weights)."""
        st, fam = self.state, self.cfg.family
        metrics = {"best_step": st.best_step, "steps": st.step, "images_seen": st.images_seen,
                   "params": self.ema.n_params}
        if fam == "ddpm":
            metrics["val_loss"] = st.best_val
        elif st.history:
            metrics["val_d_margin"] = st.history[-1]["val_d_margin"]
        return {"family": fam, "model_config": asdict(self.ema.config), "train_config": asdict(self.cfg),
                "data": self.provenance, "text_encoder_from": self.text_from, "init_from": self.init_from,
                "metrics": metrics,
                "history": st.history, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                                   "threads": torch.get_num_threads()}}


def train_images(cfg: ImageTrainConfig, workdir: str | Path, *, data: str | Path, model_cfg: dict | None = None,
                 text_from: str | Path | None = None, init_from: str | Path | None = None, threads: int | None = None,
                 on_event: Callable[[dict], None] | None = None) -> Path:
    """Train (or resume) and return the folder of the weights to register (config, weights, vocab, training.json)."""
    if threads:
        torch.set_num_threads(threads)
    trainer = ImageTrainer(cfg, workdir, data=data, model_cfg=model_cfg, text_from=text_from, init_from=init_from,
                           on_event=on_event)
    trainer.fit()
    atomic_write_json(trainer.best_dir / "training.json", trainer.record())
    return trainer.best_dir


__all__ = ["ImageTrainConfig", "ImageTrainer", "train_images", "FAMILIES", "EmojiSet"]


def train_image_job(family: str, job) -> Path | None:
    """A job's steps 3–4 for ddpm / dcgan (`job` is a families.base.TrainJob): on an uploaded .npz
    (images, optional names as captions), from scratch or fine-tuning a registered version (its
    architecture, vocabulary and weights; an upscaler it carries comes along into the new version)."""
    import shutil

    from atelier.common.files import atomic_write_json
    from atelier.models import upscaler
    from atelier.training.hyperparameters import TrainError, given

    h = given(job.hyperparameters)
    steps = min(int(h.get("max_steps", 500)), job.max_steps)
    base = job.base
    job.stage(f"building the model: fine-tuning {job.base_ref}" if base else
              f"building the model: {family} from scratch")
    # Fine-tuning starts from trained weights: a gentler rate, so the base's drawing survives.
    base_lr = {"ddpm": 8e-4, "dcgan": 2e-4}[family] / (4 if base else 1)
    cfg = ImageTrainConfig(family=family, max_steps=steps, batch_size=int(h.get("batch_size", 16)),
                           lr=base_lr * float(h.get("learning_rate_multiplier", 1.0)),
                           warmup_steps=int(h.get("warmup_steps", min(100, steps // 10))),
                           eval_every=int(h.get("eval_every", max(1, steps // 5))),
                           grad_clip=float(h.get("grad_clip", 1.0)), seed=job.seed)
    try:
        trainer = ImageTrainer(cfg, job.workdir / "train", data=job.train_path, init_from=base, on_event=job.on_event)
    except ValueError as e:
        raise TrainError(str(e), code="invalid_training_file", param="training_file") from None
    trainer.should_stop = job.should_stop
    trainer.fit()
    if job.should_stop():
        return None
    atomic_write_json(trainer.best_dir / "training.json", trainer.record())
    if base is not None and upscaler.available(base):
        for name in (upscaler.CONFIG_FILE, upscaler.WEIGHTS_FILE):
            shutil.copyfile(base / name, trainer.best_dir / name)
    return trainer.best_dir
