"""Limits on how a request arrives: its body's size (enforced while it streams in: Content-Length can
lie) and pace (a body that stalls is cut off), and a key checked before any body is read."""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException

from atelier.api.deps import key_from_header
from atelier.api.errors import DATABASE_DOWN, APIError, database_unavailable


# Routes that take file uploads get ATELIER_MAX_UPLOAD_BYTES instead of ATELIER_MAX_BODY_BYTES.
UPLOAD_PATHS = ("/v1/files", "/api/models/import", "/v1/images/edits", "/api/style-transfer")


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI re-raises HTTP errors met while reading the body."""


class BodyTimeout(HTTPException):
    """The client stopped sending its body."""


async def reply_error(send, status: int, body: dict, close: bool = False) -> None:
    """An error answered from a middleware, before any route runs: OpenAI's error shape as JSON."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": data})


def invalid_request(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def body_limit(app, max_bytes: int, upload_bytes: int, upload_paths: tuple[str, ...] = UPLOAD_PATHS,
               timeout_s: float = 30.0):
    """Bodies up to max_bytes; up to upload_bytes (plus multipart overhead) on upload routes; each part of a
    body must arrive within timeout_s of the one before (a stalled client does not hold a request open)."""

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
            return await reply_error(send, 413, invalid_request(message, "request_too_large"))
        seen, complete = 0, False

        async def receive_counted():
            nonlocal seen, complete
            if complete:  # afterwards the app only listens for the client leaving: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), timeout=timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(408, f"the request body stalled for {timeout_s:g} s (ATELIER_BODY_TIMEOUT_S)") \
                    from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                complete = not msg.get("more_body", False)
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
                await reply_error(send, 413, invalid_request(message, "request_too_large"))
        except BodyTimeout as e:
            if not started:
                await reply_error(send, 408, invalid_request(e.detail, "request_timeout"))

    return asgi


PROTECTED = ("/v1/", "/api/")
WITH_BODY = (b"POST", b"PUT", b"PATCH")


def key_gate(app, keys):
    """A request with a body to a route that needs a key is answered 401 before its body is read, when it
    has no key or a key that is not valid (the route itself still checks the key's scopes). `keys`: the
    server's KeyCache."""
    async def asgi(scope, receive, send):
        if scope["type"] != "http" or scope["method"].encode() not in WITH_BODY or \
                not scope["path"].startswith(PROTECTED):
            return await app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        try:
            # The route's own key check (deps.current_key) takes this one instead of reading it again.
            scope.setdefault("state", {})["gate_key"] = key_from_header(keys, header)
        except APIError as e:
            return await reply_error(send, e.status, e.body(), close=True)
        except DATABASE_DOWN as e:
            return await reply_error(send, 503, database_unavailable(e).body())
        return await app(scope, receive, send)

    return asgi
