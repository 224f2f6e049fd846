"""Uploaded files: reading them within the server's limits, finding them by id (OpenAI-shaped 4xx errors)."""

from __future__ import annotations

import base64
import binascii

from fastapi import UploadFile

from atelier.api.errors import APIError, bad_request, not_found
from atelier.images.png import ImageInputError, open_upload
from atelier.storage.db import File
from atelier.storage.ownership import owns


async def read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"file is larger than the limit of {limit} bytes (ATELIER_MAX_UPLOAD_BYTES)",
                           param="file", code="file_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def open_base64_image(data: str, settings, *, param: str, label: str, base64_code: str = "invalid_value"):
    """(RGB image, its bytes) from a base64 picture in a JSON body, within the upload limits (decompression
    bombs refused); a 400 naming `param` and, in its message, `label` (images[2], the picture) otherwise."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{label} is not base64", param, code=base64_code) from None
    try:
        image = open_upload(raw, max_bytes=settings.max_image_upload_bytes, max_pixels=settings.max_image_upload_pixels)
    except ImageInputError as e:
        raise bad_request(f"{label}: {e}", param, code=e.code) from None
    return image, raw


def get_file(db, file_id: str, param: str = "file_id", *, key) -> File:
    """The file, if it is `key`'s (or `key` is an admin's); another key's file is a 404 like a missing one."""
    f = db.get(File, file_id)
    if f is None or not owns(key, f.key_id):
        raise not_found(f"file {file_id!r} does not exist", param)
    return f
