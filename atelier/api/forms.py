"""Reading multipart form fields (style transfer takes images as files): numbers in range, images
decoded safely, OpenAI-shaped 400s that name the field."""

from __future__ import annotations

import hashlib

from fastapi import Request
from starlette.datastructures import UploadFile

from atelier.api.errors import bad_request
from atelier.images.png import ImageInputError, open_upload


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
