"""POST /v1/images/generations and /v1/images/edits (style transfer), POST /api/style-transfer.

A thin translation onto the image engine (atelier/runtime/image_engine.py) and the style
transfer functions (atelier/images/style.py). Every image is a PNG with its parameters
inside (atelier/images/png.py) and is stored as an artifact unless `store` is false.

Image i of a request uses seed + i (as choices of a text request do), so it is the same
image as image 0 of a request with seed + i.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from atelier.api.deps import GenerateKey, SessionDep, SettingsDep
from atelier.api.errors import APIError, bad_request
from atelier.api.models_lookup import resolve_version
from atelier.images.png import ImageInputError, a1111_parameters, encode_png, open_upload, upscale
from atelier.storage.artifacts import create_artifact, signed_path, signing_secret
from atelier.runtime.image_engine import IMAGE_FAMILIES, EngineClosed, ImageDone, ImageJob, Preview, Progress

router = APIRouter(tags=["images"])

MAX_GUIDANCE = 20.0
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 3.0
# OpenAI fields accepted only at the values that describe what Atelier does (PNG, opaque, …).
ACCEPTED = {"quality": {"auto", "standard", None}, "background": {"auto", "opaque", None},
            "output_format": {"png", None}, "moderation": {"auto", "low", None}, "style": {None},
            "output_compression": {None, 100}, "input_fidelity": {None}, "mask": {None}}


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


def check_openai_fields(values: dict) -> None:
    for name, ok in ACCEPTED.items():
        if name in values and values[name] not in ok:
            allowed = ", ".join(sorted(str(v) for v in ok if v is not None)) or "nothing (leave it unset)"
            raise bad_request(f"{name}={values[name]!r} is not supported by Atelier; accepted: {allowed}", name,
                              code="unsupported_parameter")


def check_prompt(text: str, settings, param: str = "prompt", allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise bad_request(f"{param} is empty", param, code="empty_prompt")
    if len(text) > settings.max_prompt_chars:
        raise bad_request(f"{param} has {len(text)} characters; the limit is {settings.max_prompt_chars} "
                          "(ATELIER_MAX_PROMPT_CHARS)", param, code="prompt_too_long")
    return text


def image_model(request: Request, db, ref: str):
    version = resolve_version(db, ref)
    if version.model.family not in IMAGE_FAMILIES:
        raise bad_request(f"model {version.model.name!r} ({version.model.task}) cannot generate images; image "
                          "models have task image-generation (GET /v1/models)", "model", code="model_not_supported")
    s = request.app.state.settings
    try:
        return request.app.state.manager.get_image(version, max_batch=s.image_max_batch,
                                                   max_wait_ms=s.image_batch_wait_ms)
    except (OSError, ValueError) as e:
        raise APIError(503, f"model {ref!r} could not be loaded: {e}", type="server_error",
                       code="model_load_failed") from None


def store_png(request: Request, png: bytes, *, model_ref: str, key_id: str | None, params: dict):
    """Blob + artifact row, in a fresh session (this runs in a worker thread)."""
    with request.app.state.sessions() as db:
        return create_artifact(db, request.app.state.blobs, kind="image", data=png, mime="image/png",
                               model_ref=model_ref, key_id=key_id, params=params)


def artifact_url(request: Request, artifact_id: str) -> str:
    s = request.app.state.settings
    path = signed_path(signing_secret(s.home_dir), artifact_id, expires=int(time.time()) + s.url_ttl_s)
    return str(request.base_url).rstrip("/") + path


def _sse(event: str, obj: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- generation -------------------------------------------------------------------------


@router.post("/v1/images/generations")
async def create_image(body: ImageGenerateRequest, request: Request, db: SessionDep, settings: SettingsDep,
                       key: GenerateKey):
    """Text to image (OpenAI's images.generate); extra fields seed, steps, guidance, negative_prompt, upscaler,
    store."""
    check_openai_fields(body.model_extra or {})
    loaded = image_model(request, db, body.model)
    prompt = check_prompt(body.prompt, settings)
    negative = check_prompt(body.negative_prompt or "", settings, "negative_prompt", allow_empty=True)
    if body.n > settings.max_image_n:
        raise bad_request(f"n={body.n} is above this server's limit of {settings.max_image_n} (ATELIER_MAX_IMAGE_N)",
                          "n")
    size = loaded.sizes[0] if body.size in (None, "auto") else body.size
    if size not in loaded.sizes:
        raise bad_request(f"size={size!r} is not served by {loaded.ref}; sizes: {', '.join(loaded.sizes)} "
                          f"(the first is native, the others are upscales)", "size",
                          code="unsupported_size")
    factor = int(size.split("x")[0]) // int(loaded.sizes[0].split("x")[0])
    method = body.upscaler or loaded.upscalers[0]
    if method not in loaded.upscalers:
        raise bad_request(f"upscaler={method!r} is not available for {loaded.ref}; upscalers: "
                          f"{', '.join(loaded.upscalers)}", "upscaler", code="unsupported_upscaler")
    method = method if factor > 1 else None  # the native size is never resampled
    if loaded.family == "ddpm":
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
                raise bad_request(f"{name} does not apply to {loaded.ref} (a {loaded.family} model samples in one "
                                  "step)", name, code="unsupported_parameter")
        if body.partial_images:
            raise bad_request(f"partial_images does not apply to {loaded.ref} (one step, no previews)",
                              "partial_images", code="unsupported_parameter")
        steps, guidance = None, None
    if body.response_format == "url" and not body.store:
        raise bad_request("response_format='url' needs the image stored; drop store=false or ask for b64_json",
                          "response_format")
    seed = body.seed if body.seed is not None else secrets.randbits(62)
    seeds = [(seed + i) % 2**63 for i in range(body.n)]
    sampler = "DDIM" if loaded.family == "ddpm" else "DCGAN"
    job = loaded.engine.submit(ImageJob(prompts=[prompt] * body.n, seeds=seeds, loop=asyncio.get_running_loop(),
                                        events=asyncio.Queue(), negative_prompt=negative, steps=steps or 1,
                                        guidance=guidance or 0.0,
                                        previews=body.partial_images if body.stream else 0))
    created = int(time.time())

    def finish(index: int, image) -> tuple[bytes, dict]:
        """The final PNG of image `index` (parameters inside) and its artifact parameters."""
        meta = {"model": loaded.ref, "prompt": prompt, "negative_prompt": negative, "seed": seeds[index],
                "steps": steps, "guidance": guidance, "size": size, "sampler": sampler, "upscaler": method}
        hires = {"Hires upscale": factor, "Hires upscaler": method} if method else {}
        text = a1111_parameters(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler,
                                guidance=guidance, seed=seeds[index], size=size, model=loaded.ref, **hires)
        png = encode_png(loaded.enlarge(image, factor, method), parameters=text, meta=meta)
        return png, meta | {"n": body.n, "index": index, "request_seed": seed, "user": body.user}

    async def item(index: int, image) -> dict:
        png, params = await asyncio.to_thread(finish, index, image)
        out = {"revised_prompt": None, "seed": seeds[index]}
        if body.store:
            art = await asyncio.to_thread(store_png, request, png, model_ref=loaded.ref, key_id=key.id, params=params)
            out["artifact_id"] = art.id
            if body.response_format == "url":
                out["url"] = artifact_url(request, art.id)
        if body.response_format == "b64_json":
            out["b64_json"] = base64.b64encode(png).decode()
        return out

    async def events():
        """(event) until every image is done; the job is cancelled if the client leaves."""
        done, checked = 0, time.monotonic()
        try:
            while done < body.n:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked > 0.5:  # progress events may keep coming: check on a clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if isinstance(event, EngineClosed):
                    raise APIError(503, str(event), type="server_error", code="model_unloaded")
                if isinstance(event, Exception):
                    raise APIError(500, "image generation failed", type="server_error", code="generation_failed")
                done += isinstance(event, ImageDone)
                yield event
        finally:
            job.cancel()

    common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": size}
    if body.stream:
        async def stream():
            try:
                async for event in events():
                    if isinstance(event, Progress):
                        yield _sse("image_generation.progress", {"type": "image_generation.progress",
                                                                 "created_at": int(time.time()), "step": event.step,
                                                                 "total_steps": event.total})
                    elif isinstance(event, Preview):
                        png = encode_png(upscale(event.image, factor))  # previews: pixel-exact, cheap
                        yield _sse("image_generation.partial_image", {
                            "type": "image_generation.partial_image", "b64_json": base64.b64encode(png).decode(),
                            "created_at": int(time.time()), "partial_image_index": event.partial_index,
                            "image_index": event.index, "step": event.step, "total_steps": event.total, **common})
                    else:
                        out = await item(event.index, event.image)
                        words = len(prompt.split())
                        yield _sse("image_generation.completed", {
                            "type": "image_generation.completed", "b64_json": out.pop("b64_json", ""),
                            "created_at": int(time.time()), "image_index": event.index, **out, **common,
                            "usage": {"input_tokens": words, "output_tokens": 0, "total_tokens": words,
                                      "input_tokens_details": {"image_tokens": 0, "text_tokens": words}}})
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield _sse("error", e.body())  # OpenAI's error shape, mid-stream too
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    images: dict[int, object] = {}
    async for event in events():
        if isinstance(event, ImageDone):
            images[event.index] = event.image
    if len(images) < body.n:
        raise APIError(499, "client closed the request", code="client_closed")
    data = [await item(i, images[i]) for i in range(body.n)]
    return {"created": created, "data": data, "model": loaded.ref, "seed": seed, **common}


# -- style transfer ---------------------------------------------------------------------

STYLE_FAMILIES = {"gram"}
STYLE_SIDES = (64, 128, 256)  # longest side of the result; the content's aspect is kept
DEFAULT_STYLE_STEPS, DEFAULT_STRENGTH = 60, 0.8


def style_model(request: Request, db, ref: str):
    """(ref, RandomFeatures) of a style-transfer model; the features are cached per version."""
    from atelier.images.style import RandomFeatures
    from atelier.storage.registry import version_folder

    version = resolve_version(db, ref)
    if version.model.family not in STYLE_FAMILIES:
        raise bad_request(f"model {version.model.name!r} ({version.model.task}) does not do style transfer; use "
                          "model='style-transfer'", "model", code="model_not_supported")
    cache = getattr(request.app.state, "style_features", None)
    if cache is None:
        cache = request.app.state.style_features = {}
    key = f"{version.model.name}@{version.number}"
    if key not in cache:
        manager = request.app.state.manager
        cache[key] = RandomFeatures.from_pretrained(version_folder(manager.blobs, version, manager.cache_root))
    return key, cache[key]


async def read_form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send multipart/form-data with the image as a file part", "image",
                          code="invalid_content_type")
    try:
        return await request.form(max_files=4, max_fields=40)
    except Exception:  # noqa: BLE001 — any parser failure is the client's malformed body
        raise bad_request("malformed multipart/form-data body", None, code="invalid_multipart") from None


def form_number(form, name: str, kind, default, lo, hi):
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    if isinstance(raw, UploadFile):
        raise bad_request(f"{name} must be a plain field, not a file", name)
    try:
        value = kind(raw)
    except ValueError:
        raise bad_request(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}", name) from None
    if not lo <= value <= hi:
        raise bad_request(f"{name}={value} must be between {lo} and {hi}", name)
    return value


async def form_image(form, names: tuple[str, ...], settings, *, required: bool):
    """The decoded RGB image of the first file field in `names`, and its bytes' sha256."""
    import hashlib

    field_name = next((n for n in names if n in form), None)
    if field_name is None:
        if required:
            raise bad_request(f"{names[0]} is required (an image file)", names[0], code="missing_image")
        return None, None
    part = form.get(field_name)
    param = names[0]
    if not isinstance(part, UploadFile):
        raise bad_request(f"{param} must be a file part (PNG, JPEG or WebP)", param, code="invalid_image")
    data = await part.read()
    try:
        image = open_upload(data, max_bytes=settings.max_image_upload_bytes, max_pixels=settings.max_image_upload_pixels)
    except ImageInputError as e:
        raise bad_request(str(e), param, code=e.code) from None
    return image, hashlib.sha256(data).hexdigest()


async def style_transfer(request: Request, form, settings, key, *, content_fields: tuple[str, ...],
                         style_field: str, default_model: str = "style-transfer") -> dict:
    """Shared by /v1/images/edits and /api/style-transfer: validate, run in a thread, store, answer."""
    import threading

    from atelier.images.style import METHODS, list_styles, load_style, normalise_style_name, transfer

    for name in ("mask",):
        if name in form:
            raise bad_request(f"{name} is not supported by style transfer", name, code="unsupported_parameter")
    check_openai_fields({k: form.get(k) for k in ("quality", "background", "output_format", "input_fidelity")
                         if k in form})
    model_ref = str(form.get("model") or default_model)
    with request.app.state.sessions() as db:
        ref, features = style_model(request, db, model_ref)
    method = str(form.get("method") or "gram")
    if method not in METHODS:
        raise bad_request(f"method={method!r} is not one of {', '.join(METHODS)}", "method")
    n = form_number(form, "n", int, 1, 1, 1)
    strength = form_number(form, "strength", float, DEFAULT_STRENGTH, 0.0, 1.0)
    steps = form_number(form, "steps", int, DEFAULT_STYLE_STEPS, 1, settings.max_image_steps)
    response_format = str(form.get("response_format") or "b64_json")
    if response_format not in ("b64_json", "url"):
        raise bad_request(f"response_format={response_format!r} is not one of b64_json, url", "response_format")
    store = str(form.get("store", "true")).lower() not in ("false", "0", "no")
    if response_format == "url" and not store:
        raise bad_request("response_format='url' needs the image stored", "response_format")
    size = str(form.get("size") or "auto")
    allowed = ["auto"] + [f"{s}x{s}" for s in STYLE_SIDES]
    if size not in allowed:
        raise bad_request(f"size={size!r} is not one of {', '.join(allowed)} (the longest side of the result; the "
                          "content's aspect ratio is kept)", "size", code="unsupported_size")
    max_side = 128 if size == "auto" else int(size.split("x")[0])
    content, content_sha = await form_image(form, content_fields, settings, required=True)
    style_image, style_sha = await form_image(form, ("style_image",), settings, required=False)
    style_name = form.get(style_field)
    style_name = style_name if isinstance(style_name, str) else ""
    if style_image is not None and style_name.strip() and style_field != "prompt":
        raise bad_request(f"give either {style_field} (a style's name) or style_image (a file), not both",
                          style_field)
    if style_image is None:
        if not style_name.strip():
            raise bad_request(f"name a style in {style_field!r} ({', '.join(sorted(list_styles()))}) or upload "
                              "style_image", style_field, code="missing_style")
        try:
            style_image = load_style(style_name)
        except KeyError as e:
            raise bad_request(str(e.args[0]), style_field, code="unknown_style") from None
        style_label = normalise_style_name(style_name)
    else:
        style_label = f"upload:{style_sha[:12]}"
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(transfer, content, style_image, features, method=method,
                                                   strength=strength, steps=steps, max_side=max_side,
                                                   should_stop=stop.is_set))
    while not work.done():
        await asyncio.wait({work}, timeout=0.5)
        if not work.done() and await request.is_disconnected():
            stop.set()  # the client left: stop at the next step
    result = work.result()
    if stop.is_set():
        raise APIError(499, "client closed the request", code="client_closed")
    h, w = result.image.shape[:2]
    losses = {"style_before": result.style_loss_before, "style": result.style_loss, "content": result.content_loss}
    sampler = {"gram": "Gram (random features)", "color": "Reinhard colour transfer"}[method]
    text = a1111_parameters(prompt=style_label, steps=result.steps if method == "gram" else None, sampler=sampler,
                            size=f"{w}x{h}", model=ref, Strength=f"{strength:g}")
    meta = {"model": ref, "style": style_label, "method": method, "strength": strength, "steps": result.steps,
            "size": f"{w}x{h}", "content_sha256": content_sha, "style_sha256": style_sha}
    png = encode_png(result.image, parameters=text, meta=meta)
    item = {"revised_prompt": None}
    if store:
        art = await asyncio.to_thread(store_png, request, png, model_ref=ref, key_id=key.id,
                                      params=meta | {"losses": losses, "n": n})
        item["artifact_id"] = art.id
        if response_format == "url":
            item["url"] = artifact_url(request, art.id)
    if response_format == "b64_json":
        item["b64_json"] = base64.b64encode(png).decode()
    return {"created": int(time.time()), "data": [item], "model": ref, "style": style_label, "method": method,
            "strength": strength, "steps": result.steps, "losses": losses, "seconds": round(result.seconds, 3),
            "size": f"{w}x{h}", "output_format": "png"}


@router.post("/v1/images/edits")
async def edit_image(request: Request, settings: SettingsDep, key: GenerateKey):
    """Style transfer in OpenAI's images.edit shape: image = content, prompt = a style name."""
    form = await read_form(request)
    return await style_transfer(request, form, settings, key, content_fields=("image", "image[]"),
                                style_field="prompt")


@router.post("/api/style-transfer")
async def native_style_transfer(request: Request, settings: SettingsDep, key: GenerateKey):
    """Multipart: content (file), style (a shipped style's name) or style_image (file), method, strength, steps."""
    form = await read_form(request)
    return await style_transfer(request, form, settings, key, content_fields=("content",), style_field="style")


@router.get("/api/styles")
def styles(key: GenerateKey):
    """The shipped style paintings, with artist, title, year and source."""
    from atelier.images.style import list_styles

    return {"object": "list", "data": [{"id": k, **v} for k, v in sorted(list_styles().items())]}
