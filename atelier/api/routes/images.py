"""POST /v1/images/generations: text to image, a thin translation onto the image engine; and
POST /api/images/prompt, the prompt helper (which words the model knows).

The engine (atelier/runtime/image_engine.py) micro-batches concurrent requests over any
image family's servable. Every image is a PNG with its parameters inside
(atelier/images/png.py) and is stored as an artifact unless `store` is false.

Image i of a request uses seed + i (as choices of a text request do), so it is the same
image as image 0 of a request with seed + i.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from atelier.api import sse
from atelier.api.deps import BlobsDep, GenerateKey, ManagerDep, ModeratorDep, SessionDep, SessionsDep, SettingsDep
from atelier.api.errors import APIError, bad_request
from atelier.api.metering import Meter, metered
from atelier.api.moderation_policy import check_input, policy_for
from atelier.api.models_lookup import acquire, unloaded
from atelier.api.outputs import artifact_url, check_openai_fields, check_prompt, store_png
from atelier.common.ids import random_bits
from atelier.images.png import a1111_parameters, encode_png, upscale
from atelier.runtime.errors import EngineClosed
from atelier.runtime.image_engine import ImageDone, ImageJob, Preview, Progress

router = APIRouter(tags=["images"])

MAX_GUIDANCE = 20.0
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 3.0
class ImageGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, max_length=20)
    response_format: Literal["b64_json", "url"] = "b64_json"
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=10)
    user: str | None = Field(default=None, max_length=256)
    # extra_body
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE)
    negative_prompt: str | None = None
    upscaler: Literal["learned", "nearest"] | None = None  # above the native size; default: learned if the model has one
    store: bool = True
    keep_alive: str | float | None = None  # how long the model stays loaded once idle ("5m", 0, -1)


# -- generation -------------------------------------------------------------------------


class PromptCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str
    keep_alive: str | float | None = None


@router.post("/api/images/prompt")
async def prompt_helper(body: PromptCheck, db: SessionDep, settings: SettingsDep, manager: ManagerDep,
                        key: GenerateKey):
    """Which words of a prompt the image model knows and which it ignores, with known words spelt like each
    ignored one (the studio's prompt helper). Nothing is generated."""
    prompt = check_prompt(body.prompt, settings, allow_empty=True)
    loaded = await acquire(manager, db, body.model, key=key, tasks=("image-generation",), keep_alive=body.keep_alive)
    try:
        explained = loaded.servable.prompt_words(prompt)
    finally:
        manager.release(loaded, body.keep_alive)
    return {"object": "image.prompt", "model": loaded.ref, "words": explained,
            "known": [w["word"] for w in explained if w["known"]],
            "ignored": [w["word"] for w in explained if not w["known"]]}


@router.post("/v1/images/generations")
async def create_image(body: ImageGenerateRequest, request: Request, db: SessionDep, settings: SettingsDep,
                       manager: ManagerDep, sessions: SessionsDep, blobs: BlobsDep, moderator: ModeratorDep,
                       key: GenerateKey, meter: Meter = Depends(metered("images", images_param="n"))):
    """Text to image (OpenAI's images.generate); extra fields seed, steps, guidance, negative_prompt, upscaler,
    store, keep_alive."""
    check_openai_fields(body.model_extra or {})
    check_input(moderator, policy_for(settings, key), [body.prompt], param="prompt", sessions=sessions, key_id=key.id,
                where="images")
    loaded = await acquire(manager, db, body.model, key=key, tasks=("image-generation",), keep_alive=body.keep_alive)
    db.close()  # the rest of the request (seconds of sampling) needs no database session of its own
    try:
        job, plan = _submit(body, loaded, settings)
    except BaseException:
        manager.release(loaded, body.keep_alive)
        raise
    release = lambda: manager.release(loaded, body.keep_alive)  # noqa: E731
    meter.model, meter.images, meter.prompt = loaded.ref, body.n, body.prompt
    return await _respond(body, request, settings, sessions, blobs, key, loaded, job, plan, release)


def _submit(body: ImageGenerateRequest, loaded, settings) -> tuple[ImageJob, dict]:
    """Check the request against the model and the limits, then queue it on the engine."""
    model = loaded.servable
    prompt = check_prompt(body.prompt, settings)
    negative = check_prompt(body.negative_prompt or "", settings, "negative_prompt", allow_empty=True)
    if body.n > settings.max_image_n:
        raise bad_request(f"n={body.n} is above this server's limit of {settings.max_image_n} (ATELIER_MAX_IMAGE_N)",
                          "n")
    size = model.sizes[0] if body.size in (None, "auto") else body.size
    if size not in model.sizes:
        raise bad_request(f"size={size!r} is not served by {loaded.ref}; sizes: {', '.join(model.sizes)} "
                          f"(the first is native, the others are upscales)", "size",
                          code="unsupported_size")
    factor = int(size.split("x")[0]) // int(model.sizes[0].split("x")[0])
    method = body.upscaler or model.upscalers[0]
    if method not in model.upscalers:
        raise bad_request(f"upscaler={method!r} is not available for {loaded.ref}; upscalers: "
                          f"{', '.join(model.upscalers)}", "upscaler", code="unsupported_upscaler")
    method = method if factor > 1 else None  # the native size is never resampled
    if model.multi_step:
        steps = body.steps if body.steps is not None else DEFAULT_STEPS
        if steps > settings.max_image_steps:
            raise bad_request(f"steps={steps} is above this server's limit of {settings.max_image_steps} "
                              "(ATELIER_MAX_IMAGE_STEPS)", "steps")
        guidance = body.guidance if body.guidance is not None else DEFAULT_GUIDANCE
        if body.partial_images > steps - 1 and body.partial_images:
            raise bad_request(f"partial_images={body.partial_images} needs more steps: at most steps − 1 = "
                              f"{steps - 1} previews", "partial_images")
    else:  # a GAN draws in one forward: these fields have nothing to act on
        for name in ("steps", "guidance", "negative_prompt"):
            if getattr(body, name) not in (None, ""):
                raise bad_request(f"{name} does not apply to {loaded.ref} (a {loaded.family.name} model samples in "
                                  "one step)", name, code="unsupported_parameter")
        if body.partial_images:
            raise bad_request(f"partial_images does not apply to {loaded.ref} (one step, no previews)",
                              "partial_images", code="unsupported_parameter")
        steps, guidance = None, None
    if body.response_format == "url" and not body.store:
        raise bad_request("response_format='url' needs the image stored; drop store=false or ask for b64_json",
                          "response_format")
    seed = body.seed if body.seed is not None else random_bits(62)
    seeds = [(seed + i) % 2**63 for i in range(body.n)]
    try:
        job = loaded.engine.submit(ImageJob(prompts=[prompt] * body.n, seeds=seeds, loop=asyncio.get_running_loop(),
                                            events=asyncio.Queue(), negative_prompt=negative, steps=steps or 1,
                                            guidance=guidance or 0.0,
                                            previews=body.partial_images if body.stream else 0))
    except EngineClosed as e:
        raise unloaded(e) from None
    return job, {"prompt": prompt, "negative": negative, "size": size, "factor": factor, "method": method,
                 "steps": steps, "guidance": guidance, "seed": seed, "seeds": seeds}


async def _respond(body: ImageGenerateRequest, request: Request, settings, sessions, blobs, key, loaded,
                   job: ImageJob, plan: dict, release):
    """Wait for the engine's events: stream them as SSE, or answer once every image is done."""
    prompt, negative, size, factor, method = (plan[k] for k in ("prompt", "negative", "size", "factor", "method"))
    steps, guidance, seed, seeds = (plan[k] for k in ("steps", "guidance", "seed", "seeds"))
    model = loaded.servable
    sampler = model.sampler
    created = int(time.time())

    def finish(index: int, image) -> tuple[bytes, dict]:
        """The final PNG of image `index` (parameters inside) and its artifact parameters."""
        meta = {"model": loaded.ref, "prompt": prompt, "negative_prompt": negative, "seed": seeds[index],
                "steps": steps, "guidance": guidance, "size": size, "sampler": sampler, "upscaler": method}
        hires = {"Hires upscale": factor, "Hires upscaler": method} if method else {}
        text = a1111_parameters(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler,
                                guidance=guidance, seed=seeds[index], size=size, model=loaded.ref, **hires)
        png = encode_png(model.enlarge(image, factor, method), parameters=text, meta=meta)
        return png, meta | {"n": body.n, "index": index, "request_seed": seed, "user": body.user}

    async def item(index: int, image) -> dict:
        png, params = await asyncio.to_thread(finish, index, image)
        out = {"revised_prompt": None, "seed": seeds[index]}
        if body.store:
            art = await asyncio.to_thread(store_png, sessions, blobs, png, model_ref=loaded.ref, key_id=key.id,
                                          params=params)
            out["artifact_id"] = art.id
            if body.response_format == "url":
                out["url"] = artifact_url(request, settings, art.id)
        if body.response_format == "b64_json":
            out["b64_json"] = base64.b64encode(png).decode()
        return out

    async def events():
        """(event) until every image is done; the job is cancelled if the client leaves."""
        try:
            async for event in sse.watch(request, job.events, body.n, lambda e: isinstance(e, ImageDone)):
                if isinstance(event, EngineClosed):
                    raise unloaded(event)
                if isinstance(event, Exception):
                    raise APIError(500, "image generation failed", type="server_error", code="generation_failed")
                yield event
        finally:
            job.cancel()

    common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": size}
    if body.stream:
        async def stream():
            try:
                async for event in events():
                    if isinstance(event, Progress):
                        yield sse.event("image_generation.progress", {"type": "image_generation.progress",
                                                                 "created_at": int(time.time()), "step": event.step,
                                                                 "total_steps": event.total})
                    elif isinstance(event, Preview):
                        png = encode_png(upscale(event.image, factor))  # previews: pixel-exact, cheap
                        yield sse.event("image_generation.partial_image", {
                            "type": "image_generation.partial_image", "b64_json": base64.b64encode(png).decode(),
                            "created_at": int(time.time()), "partial_image_index": event.partial_index,
                            "image_index": event.index, "step": event.step, "total_steps": event.total, **common})
                    else:
                        out = await item(event.index, event.image)
                        words = len(prompt.split())
                        yield sse.event("image_generation.completed", {
                            "type": "image_generation.completed", "b64_json": out.pop("b64_json", ""),
                            "created_at": int(time.time()), "image_index": event.index, **out, **common,
                            "usage": {"input_tokens": words, "output_tokens": 0, "total_tokens": words,
                                      "input_tokens_details": {"image_tokens": 0, "text_tokens": words}}})
                yield sse.DONE
            except APIError as e:
                yield sse.event("error", e.body())  # OpenAI's error shape, mid-stream too
                yield sse.DONE

        return sse.response(stream(), on_close=release)

    images: dict[int, object] = {}
    try:
        async for event in events():
            if isinstance(event, ImageDone):
                images[event.index] = event.image
        if len(images) < body.n:
            raise APIError(499, "client closed the request", code="client_closed")
        data = [await item(i, images[i]) for i in range(body.n)]
    finally:
        release()
    return {"created": created, "data": data, "model": loaded.ref, "seed": seed, **common}


