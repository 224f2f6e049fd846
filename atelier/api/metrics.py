"""Prometheus metrics: requests by route and status, latency, generated tokens, prompt tokens and how many
of them prefix caching found (vLLM's prefix-cache queries and hits)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()  # one per app, so tests can build many apps
        self.requests = Counter("atelier_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("atelier_request_seconds", "time to the response's first byte", ["route"],
                                 registry=self.registry)
        self.generated = Counter("atelier_generated_tokens_total", "tokens generated", registry=self.registry)
        self.prompted = Counter("atelier_prompt_tokens_total", "prompt tokens of finished text sequences",
                                registry=self.registry)
        self.cached = Counter("atelier_prompt_tokens_cached_total", "of those, found in a KV cache (prefix caching)",
                              registry=self.registry)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)

    def prompt(self, tokens: int, cached: int) -> None:
        self.prompted.inc(tokens)
        self.cached.inc(cached)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app):
        async def asgi(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start = time.perf_counter()
            status = {"code": 500}

            async def send_wrapped(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    route = scope.get("route")
                    path = getattr(route, "path", "unmatched")
                    self.requests.labels(scope["method"], path, str(status["code"])).inc()
                    self.latency.labels(path).observe(time.perf_counter() - start)
                await send(message)

            await app(scope, receive, send_wrapped)

        return asgi
