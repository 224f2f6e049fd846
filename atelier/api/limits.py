"""A request-body size limit, enforced while the body streams in (Content-Length can lie)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


# Routes that take file uploads get ATELIER_MAX_UPLOAD_BYTES instead of ATELIER_MAX_BODY_BYTES.
UPLOAD_PATHS = ("/v1/files", "/api/models/import", "/v1/images/edits", "/api/style-transfer")


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI re-raises HTTP errors met while reading the body."""


def body_limit(app, max_bytes: int, upload_bytes: int, upload_paths: tuple[str, ...] = UPLOAD_PATHS):
    """Bodies up to max_bytes; up to upload_bytes (plus multipart overhead) on upload routes."""

    async def reply_413(send, message):
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["path"] in upload_paths:
            limit, setting = upload_bytes + 64 * 1024, "ATELIER_MAX_UPLOAD_BYTES"
        else:
            limit, setting = max_bytes, "ATELIER_MAX_BODY_BYTES"
        message = f"request body is larger than the limit of {limit} bytes ({setting})"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await reply_413(send, message)
        seen = 0

        async def receive_counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(413, message)
            return msg

        started = False

        async def send_tracked(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await app(scope, receive_counted, send_tracked)
        except BodyTooLarge:
            if not started:
                await reply_413(send, message)

    return asgi
