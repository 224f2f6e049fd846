"""Model runtimes on Ray Serve (ATELIER_RUNTIME=ray; `pip install -e .[ray]`).

Generation leaves the server process for two Ray Serve deployments, `TextModels` and
`ImageModels`, which scale between one replica and ATELIER_RAY_MAX_REPLICAS on their queue
length. Each replica holds up to ATELIER_RAY_MODELS_PER_REPLICA model versions at once
(`@serve.multiplexed`, least recently used out), each driven by the same engine as the
local runtime: continuous batching for text, micro-batching for images. Serve routes a
version's requests to a replica that already holds it.

The server keeps its half of the contract: it resolves and unpacks a version, loads it for
what the routes need around generation (the tokenizer, a model's size and upscaler), and
swaps the in-process engine for a proxy (`RayTextEngine`, `RayImageEngine`) with the same
`submit`: events stream back through a deployment handle into the request's queue, as they
would from a local engine. The model id Serve multiplexes on names the family and the
unpacked folder, so a replica on this machine, or on a node sharing ATELIER_HOME's folder,
loads the version itself.

A replica that dies mid-request: if nothing was streamed yet the request is sent once more
(Serve starts a new replica), otherwise the request ends with a clear error; the next
request is served either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from atelier.runtime.errors import EngineClosed
from atelier.runtime.image_engine import ImageDone, ImageEngine, ImageJob
from atelier.runtime.text_engine import PREFILL_CHUNK, Finished, Sequence, TextEngine

log = logging.getLogger("atelier.runtime")

TEXT_APP, IMAGE_APP = "atelier-text", "atelier-image"
REPLICA_LOST = (RayActorError, RayTaskError)  # RayActorError covers ActorDiedError and ActorUnavailableError


def model_id(family: str, folder: Path) -> str:
    return json.dumps({"family": family, "folder": str(folder)}, sort_keys=True)


def _load(model: str):
    from atelier.families import FAMILIES

    spec = json.loads(model)
    return FAMILIES[spec["family"]].load(Path(spec["folder"]))


class _Held:
    """A model a replica holds; Serve calls __del__ when multiplexing evicts it: its engine stops."""

    def __init__(self, engine):
        self.engine, self.closed = engine, False

    def __del__(self):
        if not self.closed:
            self.closed = True
            self.engine.close()


def multiplexed(load, models_per_replica: int):
    """`@serve.multiplexed` with the per-replica count from the settings. Serve keeps its cache on the
    decorated function's object, which a bound method cannot carry: hence a plain function around it."""
    async def get_model(model: str):
        return await load(model)

    return serve.multiplexed(max_num_models_per_replica=models_per_replica)(get_model)


class _Replica:
    def __init__(self, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.requests = 0

    def stats(self) -> dict:
        """What this replica served (tests and operators: proof a request went through Ray)."""
        import os

        return {"pid": os.getpid(), "requests": self.requests}


@serve.deployment(name="TextModels")
class TextModels(_Replica):
    def __init__(self, threads: int | None, max_batch: int, models_per_replica: int, kv_dtype: str = "float32",
                 prefix_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK):
        super().__init__(threads)
        self.max_batch, self.kv_dtype, self.prefix_cache = max_batch, kv_dtype, prefix_cache
        self.prefill_chunk = prefill_chunk
        self.get_model = multiplexed(self._get_model, models_per_replica)

    async def _get_model(self, model: str) -> _Held:
        lm = await asyncio.to_thread(_load, model)
        return _Held(TextEngine(lm, self.max_batch, kv_dtype=self.kv_dtype, prefix_cache=self.prefix_cache,
                                prefill_chunk=self.prefill_chunk))

    async def generate(self, request: dict):
        """One choice: TextChunk events, then Finished (or the engine's exception)."""
        held = await self.get_model(serve.get_multiplexed_model_id())
        self.requests += 1
        events: asyncio.Queue = asyncio.Queue()
        seq = held.engine.submit(Sequence(**request, loop=asyncio.get_running_loop(), events=events))
        try:
            while True:
                _, event = await events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            seq.cancel()


@serve.deployment(name="ImageModels")
class ImageModels(_Replica):
    def __init__(self, threads: int | None, max_batch: int, wait_ms: float, models_per_replica: int,
                 image_threads: int | None = None):
        from atelier.config import every_core

        super().__init__(threads)
        self.max_batch, self.wait_ms = max_batch, wait_ms
        self.image_threads = image_threads or every_core()  # unset: the replica's own cores, as config.image_threads
        self.get_model = multiplexed(self._get_model, models_per_replica)

    async def _get_model(self, model: str) -> _Held:
        servable = await asyncio.to_thread(_load, model)
        return _Held(ImageEngine(servable, max_batch=self.max_batch, max_wait_ms=self.wait_ms,
                                 threads=self.image_threads))

    async def generate(self, request: dict):
        """One request's Progress / Preview / ImageDone events, in order."""
        held = await self.get_model(serve.get_multiplexed_model_id())
        self.requests += 1
        job = held.engine.submit(ImageJob(**request, loop=asyncio.get_running_loop(), events=asyncio.Queue()))
        done = 0
        try:
            while done < len(job.seeds):
                event = await job.events.get()
                if isinstance(event, Exception):
                    raise event
                done += isinstance(event, ImageDone)
                yield event
        finally:
            job.cancel()


class _Proxy:
    """Runs a request's stream from a deployment on the request's own event loop."""

    runtime = "ray"  # GET /api/ps says where a loaded model runs

    def __init__(self, handle, model: str, what: str):
        self.handle, self.model, self.what = handle, model, what
        self._closed = False

    def close(self) -> None:
        # The version stays in the replicas' multiplexing cache until it is the least recently used.
        self._closed = True

    def _start(self, loop, payload: dict, deliver, cancelled) -> None:
        if self._closed:
            raise EngineClosed("the model was unloaded before this request ran; retry it")
        loop.create_task(self._pump(payload, deliver, cancelled))

    async def _pump(self, payload: dict, deliver, cancelled) -> None:
        for attempt in (1, 2):
            sent = 0
            stream = self.handle.options(stream=True, multiplexed_model_id=self.model).generate.remote(payload)
            try:
                async for event in stream:
                    if cancelled():
                        stream.cancel()
                        return
                    deliver(event)
                    sent += 1
                return
            except REPLICA_LOST as e:
                if isinstance(e, RayTaskError) and not isinstance(e.cause, REPLICA_LOST):
                    log.error("%s generation failed on its Ray replica: %s", self.what, e.cause)
                    deliver(e.cause if isinstance(e.cause, Exception) else RuntimeError(str(e)))
                    return
                if sent == 0 and attempt == 1:
                    log.warning("the Ray replica serving a %s request died before answering; sending it again",
                                self.what)
                    continue
                deliver(EngineClosed(f"the Ray replica serving this {self.what} request died while it was "
                                     "generating; retry it"))
                return
            except Exception as e:  # noqa: BLE001 — reported to the waiting request, as a local engine does
                log.exception("%s request through Ray Serve failed", self.what)
                deliver(e)
                return


class RayTextEngine(_Proxy):
    """TextEngine's `submit`, served by the TextModels deployment."""

    def __init__(self, handle, model: str):
        super().__init__(handle, model, "text")

    def submit(self, seq: Sequence) -> Sequence:
        # The replica's TextEngine checks the prompt against the context (and the route has, before it).
        payload = {"index": seq.index, "prompt_ids": list(seq.prompt_ids), "params": seq.params,
                   "max_tokens": seq.max_tokens, "stop": list(seq.stop), "seed": seq.seed, "owner": seq.owner}
        self._start(seq.loop, payload, lambda event: seq.events.put_nowait((seq.index, event)),
                    lambda: seq.cancelled)
        return seq


class RayImageEngine(_Proxy):
    """ImageEngine's `submit`, served by the ImageModels deployment."""

    def __init__(self, handle, model: str):
        super().__init__(handle, model, "image")

    def submit(self, job: ImageJob) -> ImageJob:
        payload = {"prompts": list(job.prompts), "seeds": list(job.seeds), "negative_prompt": job.negative_prompt,
                   "steps": job.steps, "guidance": job.guidance, "previews": job.previews}
        self._start(job.loop, payload, job.events.put_nowait, lambda: job.cancelled)
        return job


class RayRuntime:
    """The cluster connection and the two deployments' handles, made once per server."""

    def __init__(self, settings):
        self.started_cluster = False
        if not ray.is_initialized():
            self.started_cluster = settings.ray_address is None
            ray.init(address=settings.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        serve.start(http_options={"location": "NoServer"})
        scaling = {"min_replicas": 1, "max_replicas": settings.ray_max_replicas, "target_ongoing_requests": 8}
        options = {"ray_actor_options": {"num_cpus": settings.ray_replica_cpus}, "autoscaling_config": scaling,
                   "max_ongoing_requests": 64}
        self.text = serve.run(TextModels.options(**options).bind(settings.threads, settings.max_batch,
                                                                 settings.ray_models_per_replica,
                                                                 settings.kv_cache_dtype, settings.prefix_cache,
                                                                 settings.prefill_chunk),
                              name=TEXT_APP, route_prefix=None)
        self.image = serve.run(ImageModels.options(**options).bind(settings.threads, settings.image_max_batch,
                                                                   settings.image_batch_wait_ms,
                                                                   settings.ray_models_per_replica,
                                                                   settings.image_threads),
                               name=IMAGE_APP, route_prefix=None)
        log.info("model runtimes on Ray Serve: %s, %s", TEXT_APP, IMAGE_APP)

    kinds = ("text", "image")  # the engines it runs instead of the server

    def engine(self, kind: str, family: str, folder: Path, servable=None):
        """The proxy that stands where the local runtime puts an engine."""
        if kind == "text":
            return RayTextEngine(self.text, model_id(family, folder))
        return RayImageEngine(self.image, model_id(family, folder))

    def close(self) -> None:
        try:
            if self.started_cluster:
                serve.shutdown()
                ray.shutdown()
            else:  # a cluster we joined keeps running; only our applications leave it
                serve.delete(TEXT_APP)
                serve.delete(IMAGE_APP)
        except Exception:  # noqa: BLE001 — shutting down: nothing left to serve
            log.exception("stopping Ray Serve")
