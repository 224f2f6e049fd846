"""Prometheus metrics: requests by route and status, latency, generated tokens, prompt tokens and how many
of them prefix caching found (vLLM's prefix-cache queries and hits), and per text model the time to a choice's
first token and between its tokens (vLLM's time_to_first_token and inter_token_latency)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# vLLM's time-to-first-token buckets, and inter-token ones from half a millisecond (a small model's step on a CPU)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0)


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
        self.first_token = Histogram("atelier_time_to_first_token_seconds",
                                     "from a text generation request's arrival to each choice's first token",
                                     ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.between_tokens = Histogram("atelier_inter_token_latency_seconds",
                                        "before each of a choice's tokens but the first, as the server receives them "
                                        "(tokens that arrive together: the first waited, the others 0)", ["model"],
                                        buckets=ITL_BUCKETS, registry=self.registry)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)

    def token_times(self, model: str, firsts: list[float], gaps: list[float], together: int) -> None:
        """What arrived at once for one request's choices: the waits for first tokens, the gaps before later
        tokens, and how many tokens came with another (in one step's chunk, or several steps' when the loop lags)."""
        for wait in firsts:
            self.first_token.labels(model).observe(wait)
        between = self.between_tokens.labels(model)
        for gap in gaps + [0.0] * together:
            between.observe(gap)

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
            scope.setdefault("state", {})["arrived"] = start  # request.state.arrived: the routes' time to first token
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
