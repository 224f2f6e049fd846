"""Image → poem: a picture sent as a data URL becomes keywords (the image tagger), and the poem is
written around them (`POST /api/poems` with `image`, `image_url` parts on /v1/chat/completions).

Pictures travel inside the JSON body, so ATELIER_MAX_BODY_BYTES bounds them first; decoded,
they obey the upload limits (ATELIER_MAX_IMAGE_UPLOAD_BYTES, …_PIXELS). Atelier never fetches
a URL: an http(s) image is refused with a 400 that says how to send it instead.
"""

from __future__ import annotations

import hashlib

from fastapi.concurrency import run_in_threadpool

from atelier.api.errors import APIError, bad_request
from atelier.api.models_lookup import acquire
from atelier.api.uploads import open_base64_image

DATA_URL_PREFIX = "data:"


async def see_picture(manager, db, settings, value: str, *, key, tagger: str | None,
                      param: str) -> tuple[dict, str]:
    """What the picture shows, ({"keywords": [{keyword, gloss, score, source}], "tags": [...], "model": ref},
    sha256 of its bytes), from a data URL (`data:image/png;base64,…`) or bare base64. A 422 when the
    tagger sees nothing it knows and the picture has no colour to speak of."""
    image, raw = open_base64_image(_base64_of(value, param), settings, param=param, label="the picture",
                                   base64_code="invalid_image")
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
    return found | {"model": loaded.ref}, hashlib.sha256(raw).hexdigest()


def _base64_of(value: str, param: str) -> str:
    """The base64 of a data URL (or the value itself); remote URLs are refused, never fetched."""
    if value.startswith(("http://", "https://", "ftp://", "file:")):
        raise bad_request("remote image URLs are refused: Atelier never fetches a URL. Send the picture itself "
                          "as a data URL (data:image/png;base64,…)", param, code="remote_image_refused")
    if not value.startswith(DATA_URL_PREFIX):
        return value
    head, sep, data = value.partition(",")
    if not sep or not head.endswith(";base64") or not head[len(DATA_URL_PREFIX):].startswith("image/"):
        raise bad_request("a picture must be a base64 data URL of an image: data:image/png;base64,…",
                          param, code="invalid_image")
    return data


__all__ = ["see_picture"]
