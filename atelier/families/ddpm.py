"""ddpm: a small text-conditioned UNet diffusion model (atelier/models/ddpm.py), sampled with DDIM.

Served by the image engine (micro-batching, previews at chosen steps); trained from an
uploaded .npz of images, from scratch or fine-tuning a version; `emoji-diffusion` ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from atelier.families.base import Family, TrainJob
from atelier.images.upscaling import Enlarger, image_sizes, upscalers
from atelier.models import ddpm
from atelier.training import hyperparameters

class Diffusion(Enlarger):
    """A ddpm version as the image engine drives it (families/base.py: ImageServable)."""

    sampler, multi_step, stepwise = "DDIM", True, True

    def __init__(self, folder: Path):
        self.model, self.vocab = ddpm.from_pretrained(folder)
        # Feature maps channels-last: oneDNN's convolutions (70 % of a step) read and write them as they are,
        # where NCHW maps were reordered into its blocked layout and back around every convolution. A UNet
        # forward took 0.74 of the time at 2 rows and 0.77 at 32 on an AMD EPYC (Zen 5), one thread.
        self.model.to(memory_format=torch.channels_last)
        super().__init__(folder, json.loads((folder / ddpm.CONFIG_FILE).read_text(encoding="utf-8")))

    def prompt_words(self, prompt: str) -> list[dict]:
        return self.vocab.explain(prompt)

    def generate(self, prompts, seeds, *, steps, guidance, negative_prompts, on_step) -> np.ndarray:
        return ddpm.generate(self.model, self.vocab, prompts, seeds, steps=steps, guidance=guidance,
                             negative_prompts=negative_prompts, on_step=on_step).numpy()

    def start(self, prompt, seed, *, steps, guidance, negative_prompt) -> ddpm.Sample:
        return ddpm.start(self.model, self.vocab, prompt, seed, steps=steps, guidance=guidance,
                          negative_prompt=negative_prompt)

    def denoise(self, samples: list[ddpm.Sample]) -> list:
        return ddpm.denoise(self.model, samples)

    def images(self, samples: list[ddpm.Sample]) -> np.ndarray:
        return ddpm.to_uint8(torch.cat([s.x for s in samples])).numpy()

    def preview(self, x0: list) -> np.ndarray:
        """`denoise`'s estimates of x_0 for some samples → (B, S, S, 3) uint8."""
        return ddpm.to_uint8(torch.cat(x0)).numpy()


class Ddpm(Family):
    name = "ddpm"
    task = "image-generation"
    engine = "image"
    train_formats = ("npz",)
    fine_tunable = True
    shipped = ("emoji-diffusion",)

    def describe(self, config: dict, files: dict) -> dict:
        return {"image_sizes": image_sizes(config), "upscalers": upscalers(files)}

    def load(self, folder: Path) -> Diffusion:
        return Diffusion(Path(folder))

    def check_hyperparameters(self, hyper: dict) -> dict:
        return hyperparameters.check(hyper, hyperparameters.IMAGE_ACCEPTED, family=self.name)

    def train(self, job: TrainJob) -> Path | None:
        from atelier.training.image_trainer import train_image_job

        return train_image_job(self.name, job)


family = Ddpm()
