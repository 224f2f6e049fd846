"""Micro-batching for image models (any ImageServable, atelier/families/base.py): concurrent
requests to one model share forward passes.

One engine per loaded image model, with one worker thread. A request is a list of images
(prompt, seed) plus shared settings. The worker:
  1. takes the oldest waiting request, then waits `max_wait_ms` for more requests that can
     share its batch (same model; for a multi-step model the same number of steps), and as
     long again after each one that joins (a burst arrives over tens of milliseconds), for
     at most GATHER_WAITS × `max_wait_ms` in all, until the batch holds `max_batch` images
  2. samples the batch, on one thread for every IMAGES_PER_THREAD images up to `threads` (an
     OpenMP team of this thread's own: torch's threads elsewhere stay as they are).
     A stepwise model (ddpm) runs it a step at a time, each step one UNet forward of
     2 × images rows (prompt and negative prompt, each image at its own timestep), and
     requests that arrive meanwhile join at the next step with their own number of steps, up
     to `max_batch` images: a request never waits for a running batch to end. Other models
     (dcgan: one generator forward; an imported diffusers pipeline: its own loop) sample the
     whole batch at once
  3. hands each request its progress, previews and final images as they come
A request whose client has gone is cancelled: its events stop, a stepwise batch drops its
images at the next step, and a whole batch whose requests are all cancelled stops there.

Batching does not change results: each image's noise comes from its own seeded generator
and the model files make every sample's arithmetic independent of its batch (see
atelier/common/layers.py), so an image is byte-identical alone or in a batch of 16, on one
thread or two (the convolutions split their work, not their sums).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from atelier.runtime.errors import EngineClosed

log = logging.getLogger(__name__)

# A thread for every 4 images of a batch: emoji-diffusion's 32-row forward (16 images) takes 0.55 of its
# time on two threads, an 8-row one (4 images) 0.8, a lone image's 0.85, not worth a second core (measured
# on an Intel CPU with NCHW maps; on an AMD EPYC with channels-last ones, a lone image's is 0.72).
IMAGES_PER_THREAD = 4
# The longest a batch gathers, in waits: 16 clients' requests arriving at once reached the engine over
# ~30 ms, and a fixed 10 ms window split them into batches of 4 and 12, the 12 waiting for the 4.
GATHER_WAITS = 4

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
    finished: bool = False  # its images are handed over: nothing more is sent to it
    preview_steps: set[int] = field(default_factory=set)

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _AllCancelled(Exception):
    pass


class _Sampling(NamedTuple):
    """One image of a stepwise batch: its request, which of the request's images it is, and its state."""

    job: ImageJob
    index: int
    state: object  # the model's (ddpm.Sample)


def preview_steps(steps: int, previews: int) -> list[int]:
    """Steps after which previews are sent: evenly spaced, never the last one (that is the final image)."""
    if previews <= 0 or steps < 2:
        return []
    picks = sorted({max(1, round(steps * (k + 1) / (previews + 1))) for k in range(previews)})
    return [s for s in picks if s < steps]


class ImageEngine:
    def __init__(self, model, *, max_batch: int = 16, max_wait_ms: float = 10.0, threads: int = 1):
        self.model = model
        self.max_batch, self.max_wait, self.threads = max_batch, max_wait_ms / 1000, threads
        self._queue: deque[ImageJob] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0  # observability (tests, metrics): how many batched forwards (or steps) were run
        self.batch_sizes: list[int] = []  # images each batch took (stepwise: each group that joined together)
        self.batch_threads: list[int] = []  # the threads it first ran on
        self.cancelled_jobs = 0  # requests whose sampling stopped because their client left
        self.busy = False
        self._running: list[ImageJob] = []
        self._thread = threading.Thread(target=self._worker, name="image-engine", daemon=True)
        self._thread.start()

    def submit(self, job: ImageJob) -> ImageJob:
        job.preview_steps = set(preview_steps(job.steps, job.previews)) if self.model.multi_step else set()
        with self._cond:
            if self._closed:
                raise EngineClosed("the model was unloaded before this request ran; retry it")
            self._queue.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Stop taking work; queued requests and the batch running now end with EngineClosed."""
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.emit(EngineClosed("the model was unloaded before this request ran; retry it"))
                job.cancel()
            self._queue.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in running:  # the batch stops at its next step (every job in it cancelled)
            if not job.finished:
                job.emit(EngineClosed("the model was unloaded while this request was generating; retry it"))
                job.cancel()
        self._thread.join(timeout=30)

    # -- worker ---------------------------------------------------------------------------
    def _key(self, job: ImageJob):
        """Requests with the same key may share a batch: a whole-batch multi-step model's need the same steps."""
        return job.steps if self.model.multi_step and not self.model.stepwise else None

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
            start = time.monotonic()
            deadline = start + self.max_wait
            while count < self.max_batch:
                for job in list(self._queue):
                    if not job.cancelled and self._key(job) == key and count + len(job.seeds) <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        count += len(job.seeds)
                        deadline = min(start + GATHER_WAITS * self.max_wait, time.monotonic() + self.max_wait)
                left = deadline - time.monotonic()
                if count >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(timeout=left)
            return batch

    def _worker(self) -> None:
        run = self._run_stepwise if self.model.stepwise else self._run
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self.busy, self._running = True, batch
            try:
                run(batch)
            except _AllCancelled:
                self.cancelled_jobs += len(batch)
                log.info("image batch cancelled (every client left)")
            except Exception as e:  # noqa: BLE001 — reported to each waiting request
                log.exception("image generation failed")
                for job in self._running:
                    job.emit(e)
            finally:
                self.busy, self._running = False, []

    def _threads(self, images: int) -> int:
        return min(self.threads, max(1, images // IMAGES_PER_THREAD))

    def _run_stepwise(self, batch: list[ImageJob]) -> None:
        """Sample `batch` a step at a time; requests that arrive meanwhile join at the next step (each at its
        own first step), up to `max_batch` images. A request's images end when its own schedule does."""
        rows: list[_Sampling] = []
        joined: list[ImageJob] = batch

        while joined or rows:
            for job in joined:
                rows += [_Sampling(job, n, self.model.start(p, s, steps=job.steps, guidance=job.guidance,
                                                            negative_prompt=job.negative_prompt))
                         for n, (p, s) in enumerate(zip(job.prompts, job.seeds))]
            if joined:
                self.batch_sizes.append(sum(len(j.seeds) for j in joined))
                self.batch_threads.append(self._threads(len(rows)))
            left = [r for r in rows if not r.job.cancelled]
            self.cancelled_jobs += len({id(r.job) for r in rows} - {id(r.job) for r in left})
            rows = left
            if rows:
                self.batches_run += 1
                with openmp_threads(self._threads(len(rows))):
                    x0 = self.model.denoise([r.state for r in rows])
                self._hand_over(rows, x0)
                rows = [r for r in rows if not r.state.done]
            with self._cond:  # whoever waits now joins, without waiting for more
                joined, count = [], len(rows)
                for job in list(self._queue):
                    if job.cancelled:
                        self._queue.remove(job)
                    elif self._closed or count + len(job.seeds) > self.max_batch:
                        break
                    else:
                        self._queue.remove(job)
                        joined.append(job)
                        count += len(job.seeds)
                self._running = list({id(r.job): r.job for r in rows}.values()) + joined

    def _hand_over(self, rows: list[_Sampling], x0: list) -> None:
        """After a step: each request's progress, previews at its preview steps, and its images once done."""
        jobs: dict[int, list[int]] = {}
        for k, r in enumerate(rows):
            jobs.setdefault(id(r.job), []).append(k)
        for ks in jobs.values():
            job, step = rows[ks[0]].job, rows[ks[0]].state.step
            job.emit(Progress(step, job.steps))
            if step in job.preview_steps:
                previews = self.model.preview([x0[k] for k in ks])
                for m, k in enumerate(ks):
                    job.emit(Preview(rows[k].index, step, job.steps, sorted(job.preview_steps).index(step),
                                     previews[m]))
            if rows[ks[0]].state.done:
                images = self.model.images([rows[k].state for k in ks])
                job.finished = True  # before its last events: close() must not send it anything after them
                for m, k in enumerate(ks):
                    job.emit(ImageDone(rows[k].index, images[m]))

    def _run(self, batch: list[ImageJob]) -> None:
        prompts = [p for j in batch for p in j.prompts]
        seeds = [s for j in batch for s in j.seeds]
        self.batches_run += 1
        self.batch_sizes.append(len(seeds))
        offsets, o = [], 0
        for j in batch:
            offsets.append(o)
            o += len(j.seeds)
        steps = batch[0].steps
        negatives = [j.negative_prompt for j in batch for _ in j.seeds]
        guidance = [j.guidance for j in batch for _ in j.seeds]

        def on_step(i: int, x0) -> None:
            if all(j.cancelled for j in batch):
                raise _AllCancelled()
            previews = None
            for j, off in zip(batch, offsets):
                j.emit(Progress(i, steps))
                if i in j.preview_steps:
                    previews = self.model.preview(x0) if previews is None else previews
                    k = sorted(j.preview_steps).index(i)
                    for n in range(len(j.seeds)):
                        j.emit(Preview(n, i, steps, k, previews[off + n]))

        threads = self._threads(len(seeds))
        self.batch_threads.append(threads)
        with openmp_threads(threads):
            images = self.model.generate(prompts, seeds, steps=steps, guidance=guidance, negative_prompts=negatives,
                                         on_step=on_step if self.model.multi_step else None)
        if not self.model.multi_step:
            for j in batch:
                j.emit(Progress(1, 1))
        for j, off in zip(batch, offsets):
            j.finished = True
            for n in range(len(j.seeds)):
                j.emit(ImageDone(n, images[off + n]))


_controller = None  # threadpoolctl's view of the native thread pools, built on first use (it reads them all)


@contextmanager
def openmp_threads(n: int):
    """This thread's OpenMP teams (torch's convolutions and elementwise loops) of `n` threads meanwhile.
    The limit is the calling thread's own (OpenMP keeps it per thread): torch.set_num_threads would also
    change the count every thread started later takes, the text engines' among them."""
    global _controller
    if n <= 1:
        yield
        return
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    with _controller.limit(limits=n, user_api="openmp"):
        yield


__all__ = ["ImageEngine", "ImageJob", "Progress", "Preview", "ImageDone", "preview_steps"]
