"""dcgan: a text-conditioned GAN (atelier/models/dcgan.py) that draws in one forward pass.

Served by the image engine (micro-batching; no steps, guidance or previews); trained from
an uploaded .npz of images, from scratch or fine-tuning a version; `emoji-gan` ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atelier.families.base import Family, TrainJob
from atelier.images.upscaling import Enlarger, image_sizes, upscalers
from atelier.models import dcgan
from atelier.training import hyperparameters

class Gan(Enlarger):
    """A dcgan version as the image engine drives it (families/base.py: ImageServable)."""

    sampler, multi_step, stepwise = "DCGAN", False, False

    def __init__(self, folder: Path):
        self.model, self.vocab = dcgan.from_pretrained(folder)
        super().__init__(folder, json.loads((folder / "config.json").read_text(encoding="utf-8")))

    def prompt_words(self, prompt: str) -> list[dict]:
        return self.vocab.explain(prompt)

    def generate(self, prompts, seeds, *, steps, guidance, negative_prompts, on_step) -> np.ndarray:
        return dcgan.generate(self.model, self.vocab, prompts, seeds).numpy()

    def preview(self, x0) -> np.ndarray:
        raise ValueError("a GAN has no intermediate images")


class Dcgan(Family):
    name = "dcgan"
    task = "image-generation"
    engine = "image"
    train_formats = ("npz",)
    fine_tunable = True
    shipped = ("emoji-gan",)

    def describe(self, config: dict, files: dict) -> dict:
        return {"image_sizes": image_sizes(config), "upscalers": upscalers(files)}

    def load(self, folder: Path) -> Gan:
        return Gan(Path(folder))

    def check_hyperparameters(self, hyper: dict) -> dict:
        return hyperparameters.check(hyper, hyperparameters.IMAGE_ACCEPTED, family=self.name)

    def train(self, job: TrainJob) -> Path | None:
        from atelier.training.image_trainer import train_image_job

        return train_image_job(self.name, job)


family = Dcgan()
