"""Style transfer: POST /v1/images/edits (OpenAI's shape) and /api/style-transfer; GET /api/styles.

The content image is restyled after a shipped painting or an uploaded one by a style
model (the `gram` family, atelier/families/style.py), in a worker thread; the result is a
PNG with its parameters inside, stored as an artifact unless `store` is false.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time

from fastapi import APIRouter, Request

from atelier.api.deps import BlobsDep, GenerateKey, ManagerDep, SessionsDep, SettingsDep
from atelier.api.errors import APIError, bad_request
from atelier.api.forms import form_image, form_number, read_form
from atelier.api.models_lookup import acquire, check_keep_alive
from atelier.api.outputs import artifact_url, check_openai_fields, store_png
from atelier.images.png import a1111_parameters, encode_png
from atelier.images.style import METHODS, list_styles, load_style, normalise_style_name

router = APIRouter(tags=["styles"])

STYLE_SIDES = (64, 128, 256)  # longest side of the result; the content's aspect is kept
DEFAULT_STYLE_STEPS, DEFAULT_STRENGTH = 60, 0.8


async def style_transfer(request: Request, form, settings, manager, sessions, blobs, key, *,
                         content_fields: tuple[str, ...], style_field: str, default_model: str = "style-transfer") -> dict:
    """Shared by /v1/images/edits and /api/style-transfer: validate, run in a thread, store, answer."""
    for name in ("mask",):
        if name in form:
            raise bad_request(f"{name} is not supported by style transfer", name, code="unsupported_parameter")
    check_openai_fields({k: form.get(k) for k in ("quality", "background", "output_format", "input_fidelity")
                         if k in form})
    model_ref = str(form.get("model") or default_model)
    keep_alive = form.get("keep_alive") if isinstance(form.get("keep_alive"), str) else None
    check_keep_alive(keep_alive)
    method = str(form.get("method") or METHODS[0])
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
    with sessions() as db:
        loaded = await acquire(manager, db, model_ref, key=key, tasks=("style-transfer",), keep_alive=keep_alive)
    ref = loaded.ref
    try:
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(loaded.servable.transfer, content, style_image, method=method,
                                                       strength=strength, steps=steps, max_side=max_side,
                                                       should_stop=stop.is_set))
        while not work.done():
            await asyncio.wait({work}, timeout=0.5)
            if not work.done() and await request.is_disconnected():
                stop.set()  # the client left: stop at the next step
        result = work.result()
    finally:
        manager.release(loaded, keep_alive)
    if stop.is_set():
        raise APIError(499, "client closed the request", code="client_closed")
    h, w = result.image.shape[:2]
    losses = {"style_before": result.style_loss_before, "style": result.style_loss, "content": result.content_loss}
    sampler = {"patch": "Guided patch synthesis", "gram": "Gram (random features)",
               "color": "Reinhard colour transfer"}[method]
    text = a1111_parameters(prompt=style_label, steps=result.steps or None, sampler=sampler,
                            size=f"{w}x{h}", model=ref, Strength=f"{strength:g}")
    meta = {"model": ref, "style": style_label, "method": method, "strength": strength, "steps": result.steps,
            "size": f"{w}x{h}", "content_sha256": content_sha, "style_sha256": style_sha}
    png = encode_png(result.image, parameters=text, meta=meta)
    item = {"revised_prompt": None}
    if store:
        art = await asyncio.to_thread(store_png, sessions, blobs, png, model_ref=ref, key_id=key.id,
                                      params=meta | {"losses": losses, "n": n})
        item["artifact_id"] = art.id
        if response_format == "url":
            item["url"] = artifact_url(request, settings, art.id)
    if response_format == "b64_json":
        item["b64_json"] = base64.b64encode(png).decode()
    return {"created": int(time.time()), "data": [item], "model": ref, "style": style_label, "method": method,
            "strength": strength, "steps": result.steps, "losses": losses, "seconds": round(result.seconds, 3),
            "size": f"{w}x{h}", "output_format": "png"}


@router.post("/v1/images/edits")
async def edit_image(request: Request, settings: SettingsDep, manager: ManagerDep, sessions: SessionsDep,
                     blobs: BlobsDep, key: GenerateKey):
    """Style transfer in OpenAI's images.edit shape: image = content, prompt = a style name."""
    form = await read_form(request)
    return await style_transfer(request, form, settings, manager, sessions, blobs, key,
                                content_fields=("image", "image[]"), style_field="prompt")


@router.post("/api/style-transfer")
async def native_style_transfer(request: Request, settings: SettingsDep, manager: ManagerDep,
                                sessions: SessionsDep, blobs: BlobsDep, key: GenerateKey):
    """Multipart: content (file), style (a shipped style's name) or style_image (file), method, strength, steps."""
    form = await read_form(request)
    return await style_transfer(request, form, settings, manager, sessions, blobs, key, content_fields=("content",),
                                style_field="style")


@router.get("/api/styles")
def styles(key: GenerateKey):
    """The shipped style paintings, with artist, title, year and source."""
    return {"object": "list", "data": [{"id": k, **v} for k, v in sorted(list_styles().items())]}
