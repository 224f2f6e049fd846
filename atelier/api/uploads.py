"""Reading uploads and multipart forms within the server's limits, with OpenAI-shaped 4xx errors."""

from __future__ import annotations

from fastapi import UploadFile

from atelier.api.errors import APIError


async def read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"file is larger than the limit of {limit} bytes (ATELIER_MAX_UPLOAD_BYTES)",
                           param="file", code="file_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
