"""Uploaded files: reading them within the server's limits, finding them by id (OpenAI-shaped 4xx errors)."""

from __future__ import annotations

from fastapi import UploadFile

from atelier.api.errors import APIError, not_found
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


def get_file(db, file_id: str, param: str = "file_id", *, key) -> File:
    """The file, if it is `key`'s (or `key` is an admin's); another key's file is a 404 like a missing one."""
    f = db.get(File, file_id)
    if f is None or not owns(key, f.key_id):
        raise not_found(f"file {file_id!r} does not exist", param)
    return f
