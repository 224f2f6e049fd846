"""Training the ×2 upscaler on emoji pairs (32×32 → 64×64), with checkpoints and resume.

Phases of `train_upscaler`:
  1. data: the same design split as the generators (atelier/training/image_data.py), read
     at both sizes, so an image held out from the generators is held out here too
  2. model and AdamW; resume from `latest.json` when the workdir has a checkpoint
  3. loop: L1 loss on a random batch of crops; the low-resolution input is flipped half the
     time and given a little Gaussian noise (generated images are noisier than downscaled
     drawings); batches come from a generator seeded by (seed, step), so a resumed run
     sees what an uninterrupted one would
  4. every `eval_every` steps: PSNR on the held-out pairs, next to bilinear interpolation's
     PSNR on the same pairs (the baseline); best weights to `best/`, checkpoint

Events go to `on_event(dict)` like the other trainers: start, resumed, train, eval,
checkpoint, time_limit, done. Everything on disk is safetensors or JSON.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from atelier.models import upscaler
from atelier.common.files import atomic_write_json
from atelier.training.image_data import load_emoji, to_tensor
from atelier.training.trainer import load_optimizer, publish_checkpoint, save_optimizer


@dataclass
class UpscalerTrainConfig:
    max_steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    decay_steps: int | None = None  # the cosine's length (None: max_steps); fix it to extend a run without a jump
    eval_every: int = 250
    log_every: int = 10
    noise: float = 0.04  # largest σ of the input noise, in [−1, 1] units
    crop: int | None = 16  # train on random low-resolution crops of this side (None: whole images)
    seed: int = 0
    max_minutes: float | None = None


@dataclass
class UpscalerTrainState:
    step: int = 0
    best_psnr: float = -math.inf
    best_step: int = 0
    history: list[dict] = field(default_factory=list)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB over images in [−1, 1] (rounded to 8 bits first, as served)."""
    q = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = F.mse_loss(q(pred), q(target)).item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10))


class UpscalerTrainer:
    def __init__(self, cfg: UpscalerTrainConfig, workdir: str | Path, *, data: str | Path,
                 model_cfg: dict | None = None, on_event: Callable[[dict], None] | None = None):
        self.cfg, self.workdir = cfg, Path(workdir)
        self.on_event = on_event or (lambda e: None)
        torch.manual_seed(cfg.seed)
        low_train, low_val, self.provenance = load_emoji(data, size=32, seed=cfg.seed)
        high_train, high_val, _ = load_emoji(data, size=64, seed=cfg.seed)
        self.low, self.high = to_tensor(low_train.images), to_tensor(high_train.images)
        self.val_low, self.val_high = to_tensor(low_val.images), to_tensor(high_val.images)
        self.model = upscaler.Upscaler(upscaler.UpscalerConfig(**(model_cfg or {})))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.state = UpscalerTrainState()
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def best_dir(self) -> Path:
        return self.workdir / "best"

    def _lr(self, step: int) -> float:
        """Cosine decay to a tenth over decay_steps: a small network converges better with a cooling rate."""
        horizon = self.cfg.decay_steps or self.cfg.max_steps
        return self.cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / horizon, 1.0))))

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(network PSNR, bilinear PSNR) on the held-out pairs."""
        self.model.eval()
        pred = self.model(self.val_low)
        self.model.train()
        base = F.interpolate(self.val_low, scale_factor=self.model.config.scale, mode="bilinear", align_corners=False)
        return psnr(pred, self.val_high), psnr(base, self.val_high)

    def _batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.low), (self.cfg.batch_size,), generator=g)
        low, high = self.low[idx], self.high[idx]
        flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
        low, high = torch.where(flip, low.flip(-1), low), torch.where(flip, high.flip(-1), high)
        if self.cfg.crop:  # one random window per batch: cheaper steps, the same local statistics
            c, s = self.cfg.crop, self.model.config.scale
            i, j = torch.randint(0, low.shape[-1] - c + 1, (2,), generator=g).tolist()
            low, high = low[..., i:i + c, j:j + c], high[..., s * i:s * (i + c), s * j:s * (j + c)]
        sigma = torch.rand(len(idx), 1, 1, 1, generator=g) * self.cfg.noise
        return low + sigma * torch.randn(low.shape, generator=g), high

    def _checkpoint(self) -> None:
        d = self.workdir / f"checkpoint-{self.state.step}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(d / "model.safetensors"))
        save_optimizer(self.opt, d / "optimizer")
        atomic_write_json(d / "state.json", {"state": asdict(self.state), "config": asdict(self.cfg)})
        publish_checkpoint(self.workdir, d, self.state.step, self.on_event)

    def _resume(self) -> None:
        pointer = self.workdir / "latest.json"
        if pointer.exists():
            d = self.workdir / json.loads(pointer.read_text())["checkpoint"]
            self.model.load_state_dict(load_file(str(d / "model.safetensors")))
            load_optimizer(self.opt, d / "optimizer")
            self.state = UpscalerTrainState(**json.loads((d / "state.json").read_text())["state"])
            self.on_event({"type": "resumed", "step": self.state.step, "path": str(d)})

    def _eval_and_checkpoint(self) -> None:
        st = self.state
        net, base = self.evaluate()
        improved = net > st.best_psnr + 1e-4
        record = {"step": st.step, "val_psnr": net, "bilinear_psnr": base, "improved": improved}
        st.history.append(record)
        self.on_event({"type": "eval", **record})
        if improved:
            st.best_psnr, st.best_step = net, st.step
            tmp = self.workdir / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            upscaler.save_pretrained(self.model, tmp)
            shutil.rmtree(self.best_dir, ignore_errors=True)
            tmp.rename(self.best_dir)
        self._checkpoint()

    def fit(self) -> UpscalerTrainState:
        cfg = self.cfg
        self._resume()
        st = self.state
        self.model.train()
        started = window_t = time.time()
        self.on_event({"type": "start", "family": "upscaler", "step": st.step, "max_steps": cfg.max_steps,
                       "train_images": len(self.low), "val_images": len(self.val_low), "params": self.model.n_params})
        while st.step < cfg.max_steps:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
            low, high = self._batch(g)
            lr = self._lr(st.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = F.l1_loss(self.model(low), high)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            st.step += 1
            if st.step % cfg.log_every == 0:
                now = time.time()
                self.on_event({"type": "train", "step": st.step, "max_steps": cfg.max_steps, "lr": lr,
                               "loss": loss.item(), "images_per_s": cfg.log_every * cfg.batch_size / (now - window_t)})
                window_t = now
            out_of_time = cfg.max_minutes is not None and (time.time() - started) / 60 >= cfg.max_minutes
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps or out_of_time:
                self._eval_and_checkpoint()
            if out_of_time:
                self.on_event({"type": "time_limit", "step": st.step})
                break
        if not self.best_dir.exists():
            self._eval_and_checkpoint()
        self.on_event({"type": "done", "step": st.step, "best_psnr": st.best_psnr, "best_step": st.best_step})
        return st

    def record(self) -> dict:
        st = self.state
        best = next((h for h in st.history if h["step"] == st.best_step), {})
        return {"family": "upscaler", "model_config": asdict(self.model.config), "train_config": asdict(self.cfg),
                "data": self.provenance | {"pairs": "emoji32.npz → emoji64.npz"},
                "metrics": {"val_psnr": st.best_psnr, "bilinear_psnr": best.get("bilinear_psnr"),
                            "best_step": st.best_step, "steps": st.step, "params": self.model.n_params},
                "history": st.history,
                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}}


def train_upscaler(cfg: UpscalerTrainConfig, workdir: str | Path, *, data: str | Path, model_cfg: dict | None = None,
                   on_event: Callable[[dict], None] | None = None) -> Path:
    """Train (or resume) and return the folder of the best weights (upscaler.json, upscaler.safetensors, upscaler-training.json)."""
    trainer = UpscalerTrainer(cfg, workdir, data=data, model_cfg=model_cfg, on_event=on_event)
    trainer.fit()
    atomic_write_json(trainer.best_dir / "upscaler-training.json", trainer.record())
    return trainer.best_dir


__all__ = ["UpscalerTrainConfig", "UpscalerTrainer", "train_upscaler", "psnr"]
