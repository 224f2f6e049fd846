"""Rate limits and quotas on the generation routes, and the usage they count (storage/usage.py).

  1. `metered(route)`, a dependency: checks the caller's key against its limits — a 429 in
     OpenAI's shape (`rate_limit_exceeded` or `insufficient_quota`, with Retry-After) when over
     one — and, for a key with limits, records the request at once, so concurrent requests count each other
  2. the route adds what it served to `meter` (tokens, images, the model)
  3. `usage_middleware` hands that to the usage writer when the response is over (streams included;
     atelier/storage/usage_writer.py writes it behind the response) and puts OpenAI's x-ratelimit-*
     headers on every metered response
"""

from __future__ import annotations

from fastapi import Depends, Request

from atelier.api.deps import current_key
from atelier.api.errors import APIError
from atelier.storage.db import ApiKey, utcnow
from atelier.storage.usage import InFlight, admit
from atelier.storage.usage_writer import Served, UsageWriter


class Meter:
    def __init__(self, writer: UsageWriter, key_id: str, usage_id: int | None, inflight: InFlight, route: str):
        self.writer, self.key_id, self.usage_id, self.inflight = writer, key_id, usage_id, inflight
        self.route, self.started = route, utcnow()
        self.tokens = self.images = 0
        self.model = ""
        self.prompt = ""  # hashed into the audit entry, never stored
        self._closed = False

    def close(self) -> None:
        """3. The request is over: leave the key's running count and hand what it served to the usage
        writer, which writes it and the audit entry behind the response (once)."""
        if self._closed:
            return
        self._closed = True
        self.inflight.leave(self.key_id)
        self.writer.submit(Served(self.usage_id, self.key_id, self.route, self.model, self.tokens, self.images,
                                  self.prompt, self.started))


def metered(route: str, *, images_param: str | None = None):
    """The dependency for one route; `images_param` names the body field holding how many images."""

    async def dependency(request: Request, key: ApiKey = Depends(current_key)) -> Meter:
        state = request.app.state
        images = 0
        if images_param is not None:
            try:
                images = int((await request.json()).get(images_param, 1))
            except (ValueError, AttributeError, TypeError):
                images = 1
        # Check and record with nothing awaited in between, so this process's requests count each other.
        with state.sessions() as db:
            v, usage_id = admit(db, key.id, key.limits, route, images=images, parallel=state.inflight.count(key.id),
                                unwritten=state.usage_writer.pending(key.id))
        request.state.ratelimit_headers = v.headers or {}
        if not v.allowed:
            request.state.ratelimit_headers["retry-after"] = str(v.retry_after)
            raise APIError(429, v.message, type="rate_limit_error" if v.code == "rate_limit_exceeded"
                           else "insufficient_quota", code=v.code)
        state.inflight.enter(key.id)
        meter = Meter(state.usage_writer, key.id, usage_id, state.inflight, route)
        request.state.meter = meter
        return meter

    return dependency


def usage_middleware(app):
    """Adds the x-ratelimit-* (and Retry-After) headers a metered request computed; closes its meter
    once the response has been sent, or the client has gone."""

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = (scope.get("state") or {}).get("ratelimit_headers")
                if extra:
                    message = message | {"headers": list(message.get("headers", [])) +
                                         [(k.encode(), v.encode()) for k, v in extra.items()]}
            await send(message)

        try:
            await app(scope, receive, send_with_headers)
        finally:
            meter = (scope.get("state") or {}).get("meter")
            if meter is not None:
                meter.close()

    return asgi
