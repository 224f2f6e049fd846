"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers turn every failure into that shape: our own APIError, FastAPI's validation
errors (400, naming the field), HTTP errors (404/405), and anything unexpected (a logged,
generic 500 — a test that finds one has found a bug).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from atelier.safety.crypto import SealError
from atelier.storage.db import DATABASE_DOWN

log = logging.getLogger("atelier.api")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def database_unavailable(exc: Exception) -> APIError:
    return APIError(503, f"the database is unavailable ({type(exc).__name__}); retry shortly", type="server_error",
                    code="database_unavailable")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        # A field that may take several shapes (a message's content: a string or a list of parts) fails
        # once per shape; the deepest failure is the one that says what is wrong.
        same_field = [e for e in errors if e.get("loc", ())[:2] == first.get("loc", ())[:2]]
        if same_field:
            first = max(same_field, key=lambda e: len(e.get("loc", ())))
        others = len(errors) - len(same_field)
        # ("body", "max_tokens") → max_tokens; ("query", "limit") → limit; pydantic's names of the
        # shapes tried ("list[tagged-union[…]]") are left out
        loc = [str(p) for p in first.get("loc", ())[1:] if "[" not in str(p)] if first.get("loc") else []
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return JSONResponse(error_body(msg, code="invalid_json"), status_code=400)
        msg = first.get("msg", "invalid request")
        if param:
            msg = f"{param}: {msg}"
        if others:
            msg += f" (and {others} more problem{'s' if others > 1 else ''})"
        return JSONResponse(error_body(msg, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(msg, type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                                       code=_STATUS_CODES.get(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(SealError)
    async def _sealed(request: Request, exc: SealError):
        # Not the client's fault, and not to be retried blindly: a blob that fails its check.
        log.error("blob store: %s (%s %s)", exc, request.method, request.url.path)
        return JSONResponse(error_body(str(exc), type="server_error", code="blob_unreadable"), status_code=500)

    async def _database_down(request: Request, exc: Exception):
        log.error("database unavailable on %s %s: %s", request.method, request.url.path,
                  str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return JSONResponse(database_unavailable(exc).body(), status_code=503, headers={"Retry-After": "1"})

    for kind in DATABASE_DOWN:
        app.add_exception_handler(kind, _database_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", type="server_error", code="internal_error"),
                            status_code=500)
