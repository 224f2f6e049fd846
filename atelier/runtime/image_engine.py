"""Micro-batching for image models: concurrent requests to one model share forward passes.

One engine per loaded image model, with one worker thread. A request is a list of images
(prompt, seed) plus shared settings. The worker:
  1. takes the oldest waiting request, then waits up to `max_wait_ms` for more requests
     that can share its batch (same model; for ddpm the same number of steps), until the
     batch holds `max_batch` images
  2. samples the whole batch at once (ddpm: every denoising step is one UNet forward of
     2 × images rows, prompt and negative prompt; dcgan: one generator forward)
  3. hands each request its progress, previews and final images as they come
A request whose client has gone is cancelled: its events stop, and a batch whose requests
are all cancelled stops at the next step.

Batching does not change results: each image's noise comes from its own seeded generator
and the model files make every sample's arithmetic independent of its batch (see
atelier/models/ddpm.py), so an image is byte-identical alone or in a batch of 16.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from atelier.images.png import upscale as nearest
from atelier.models import dcgan, ddpm, upscaler

log = logging.getLogger(__name__)

IMAGE_FAMILIES = {"ddpm", "dcgan"}
UPSCALES = (1, 2, 4, 8)  # served sizes: the native size and upscales of it


def image_sizes(config: dict) -> list[str]:
    """Sizes a model serves, e.g. ['32x32', '64x64', '128x128', '256x256'] (the first is native)."""
    s = int(config.get("image_size", 32))
    return [f"{s * f}x{s * f}" for f in UPSCALES]


def upscalers(files) -> list[str]:
    """How a version can enlarge its images, the default first: `learned` when it carries an
    upscaler (atelier/models/upscaler.py), `nearest` (pixel-exact) always."""
    return (["learned"] if upscaler.WEIGHTS_FILE in files else []) + ["nearest"]


@dataclass
class Progress:
    step: int
    total: int


@dataclass
class Preview:
    index: int  # which image of the request
    step: int
    total: int
    partial_index: int
    image: np.ndarray  # (S, S, 3) uint8, the current estimate of the final image


@dataclass
class ImageDone:
    index: int
    image: np.ndarray  # (S, S, 3) uint8


@dataclass
class ImageJob:
    """One request: `prompts[i]` with `seeds[i]` is image i. Events arrive on `events` as (kind, payload)."""

    prompts: list[str]
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 3.0
    previews: int = 0  # partial images per image, at evenly spaced steps
    cancelled: bool = False
    preview_steps: set[int] = field(default_factory=set)

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _AllCancelled(Exception):
    pass


class EngineClosed(RuntimeError):
    """The model was unloaded while a request waited in its queue (it may be retried)."""


def preview_steps(steps: int, previews: int) -> list[int]:
    """Steps after which previews are sent: evenly spaced, never the last one (that is the final image)."""
    if previews <= 0 or steps < 2:
        return []
    picks = sorted({max(1, round(steps * (k + 1) / (previews + 1))) for k in range(previews)})
    return [s for s in picks if s < steps]


class ImageEngine:
    def __init__(self, family: str, model, vocab, *, max_batch: int = 16, max_wait_ms: float = 10.0):
        if family not in IMAGE_FAMILIES:
            raise ValueError(f"family {family!r} is not one of {', '.join(sorted(IMAGE_FAMILIES))}")
        self.family, self.model, self.vocab = family, model.eval(), vocab
        self.config = model.config
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: deque[ImageJob] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0  # observability (tests, metrics): how many batched forwards were run
        self.batch_sizes: list[int] = []
        self.cancelled_batches = 0
        self.busy = False
        self._thread = threading.Thread(target=self._worker, name=f"image-engine-{family}", daemon=True)
        self._thread.start()

    def submit(self, job: ImageJob) -> ImageJob:
        job.preview_steps = set(preview_steps(job.steps, job.previews)) if self.family == "ddpm" else set()
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._queue.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.emit(EngineClosed("the model was unloaded before this request ran; retry it"))
                job.cancel()
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- worker ---------------------------------------------------------------------------
    def _key(self, job: ImageJob):
        return job.steps if self.family == "ddpm" else None

    def _take_batch(self) -> list[ImageJob] | None:
        with self._cond:
            while not self._closed:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            batch, count, key = [first], len(first.seeds), self._key(first)
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch:
                for job in list(self._queue):
                    if not job.cancelled and self._key(job) == key and count + len(job.seeds) <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        count += len(job.seeds)
                left = deadline - time.monotonic()
                if count >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(timeout=left)
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self.busy = True
            try:
                self._run(batch)
            except _AllCancelled:
                self.cancelled_batches += 1
                log.info("image batch cancelled (every client left)")
            except Exception as e:  # noqa: BLE001 — reported to each waiting request
                log.exception("image generation failed")
                for job in batch:
                    job.emit(e)
            finally:
                self.busy = False

    def _run(self, batch: list[ImageJob]) -> None:
        prompts = [p for j in batch for p in j.prompts]
        seeds = [s for j in batch for s in j.seeds]
        self.batches_run += 1
        self.batch_sizes.append(len(seeds))
        offsets, o = [], 0
        for j in batch:
            offsets.append(o)
            o += len(j.seeds)
        if self.family == "ddpm":
            steps = batch[0].steps
            negatives = [j.negative_prompt for j in batch for _ in j.seeds]
            guidance = [j.guidance for j in batch for _ in j.seeds]

            def on_step(i: int, x0: torch.Tensor) -> None:
                if all(j.cancelled for j in batch):
                    raise _AllCancelled()
                previews = None
                for j, off in zip(batch, offsets):
                    j.emit(Progress(i, steps))
                    if i in j.preview_steps:
                        previews = ddpm.to_uint8(x0).numpy() if previews is None else previews
                        k = sorted(j.preview_steps).index(i)
                        for n in range(len(j.seeds)):
                            j.emit(Preview(n, i, steps, k, previews[off + n]))

            images = ddpm.generate(self.model, self.vocab, prompts, seeds, steps=steps, guidance=guidance,
                                   negative_prompts=negatives, on_step=on_step).numpy()
        else:
            images = dcgan.generate(self.model, self.vocab, prompts, seeds).numpy()
            for j in batch:
                j.emit(Progress(1, 1))
        for j, off in zip(batch, offsets):
            for n in range(len(j.seeds)):
                j.emit(ImageDone(n, images[off + n]))


class LoadedImageModel:
    """What the API needs of a loaded image model: its ref, family, sizes, engine, upscaler."""

    def __init__(self, version, model, vocab, engine: ImageEngine, upscaler_net: upscaler.Upscaler | None = None):
        self.key = (version.model.name, version.number)
        self.ref = f"{version.model.name}@{version.number}"
        self.family = version.model.family
        self.model, self.vocab, self.engine = model, vocab, engine
        self.sizes = image_sizes(version.config)
        self.upscaler = upscaler_net
        self.upscalers = upscalers(version.files)  # what /v1/models lists, from the same files

    def enlarge(self, image: np.ndarray, factor: int, method: str) -> np.ndarray:
        """×factor: `learned` doubles through the upscaler (then nearest-neighbour for the rest);
        `nearest` repeats pixels. One image at a time, so the bytes never depend on a batch."""
        if factor > 1 and method == "learned":
            image, factor = upscaler.upscale(self.upscaler, image), factor // 2
        return nearest(image, factor)


def load_image_model(version, folder, *, max_batch: int, max_wait_ms: float) -> LoadedImageModel:
    family = version.model.family
    module = {"ddpm": ddpm, "dcgan": dcgan}.get(family)
    if module is None:
        raise ValueError(f"model {version.model.name!r} is a {family} model; it cannot generate images")
    model, vocab = module.from_pretrained(folder)
    net = upscaler.from_pretrained(folder) if upscaler.available(folder) else None
    return LoadedImageModel(version, model, vocab,
                            ImageEngine(family, model, vocab, max_batch=max_batch, max_wait_ms=max_wait_ms), net)


__all__ = ["ImageEngine", "ImageJob", "EngineClosed", "Progress", "Preview", "ImageDone", "LoadedImageModel", "load_image_model",
           "image_sizes", "upscalers", "preview_steps", "IMAGE_FAMILIES"]
