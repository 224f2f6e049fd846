"""Image → poem: a picture sent as a data URL becomes keywords (the image tagger), and the poem is
written around them (`POST /api/poems` with `image`, `image_url` parts on /v1/chat/completions).

Pictures travel inside the JSON body, so ATELIER_MAX_BODY_BYTES bounds them first; decoded,
they obey the upload limits (ATELIER_MAX_IMAGE_UPLOAD_BYTES, …_PIXELS). Atelier never fetches
a URL: an http(s) image is refused with a 400 that says how to send it instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from fastapi.concurrency import run_in_threadpool
from PIL import Image

from atelier.api.errors import APIError, bad_request
from atelier.api.models_lookup import acquire
from atelier.images.png import ImageInputError, open_upload

DATA_URL_PREFIX = "data:"


def decode_picture(value: str, settings, param: str) -> tuple[Image.Image, str]:
    """(RGB picture, sha256 of its bytes) from a data URL (`data:image/png;base64,…`) or bare base64."""
    if value.startswith(("http://", "https://", "ftp://", "file:")):
        raise bad_request("remote image URLs are refused: Atelier never fetches a URL. Send the picture itself "
                          "as a data URL (data:image/png;base64,…)", param, code="remote_image_refused")
    data = value
    if value.startswith(DATA_URL_PREFIX):
        head, sep, data = value.partition(",")
        if not sep or not head.endswith(";base64") or not head[len(DATA_URL_PREFIX):].startswith("image/"):
            raise bad_request("a picture must be a base64 data URL of an image: data:image/png;base64,…",
                              param, code="invalid_image")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the picture is not valid base64", param, code="invalid_image") from None
    try:
        image = open_upload(raw, max_bytes=settings.max_image_upload_bytes, max_pixels=settings.max_image_upload_pixels)
    except ImageInputError as e:
        raise bad_request(str(e), param, code=e.code) from None
    return image, hashlib.sha256(raw).hexdigest()


async def picture_keywords(manager, db, settings, image: Image.Image, *, key, tagger: str | None, param: str) -> dict:
    """{"keywords": [{keyword, gloss, score, source}], "tags": [...], "model": ref} for the picture; a 422
    when the tagger sees nothing it knows and the picture has no colour to speak of."""
    loaded = await acquire(manager, db, tagger or settings.image_tagger, key=key, tasks=("image-tagging",),
                           param="tagger" if tagger else "model")

    def run():
        with loaded.lock:  # one call at a time per loaded model
            return loaded.servable.keywords(image)

    try:
        found = await run_in_threadpool(run)
    finally:
        manager.release(loaded, None)
    if not found["keywords"]:
        likeliest = "、".join(f"{t['keyword']} ({t['gloss']}, {t['score']:.2f})" for t in found["tags"][:3])
        raise APIError(422, f"{loaded.ref} recognises nothing in the picture (likeliest: {likeliest}); send "
                            "keywords instead, or a clearer picture on a plain background", param=param,
                       code="image_not_recognised")
    return found | {"model": loaded.ref}


__all__ = ["decode_picture", "picture_keywords"]
