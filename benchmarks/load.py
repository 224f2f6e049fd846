"""Load: many concurrent clients mixing every kind of request, across keys with limits.

    .venv/bin/python benchmarks/load.py [--clients 64] [--seconds 60] [--threads 1]

A real server (in this process, on loopback) with the shipped models. Three keys: one without
limits, one with rpm 120, one with max_parallel 2 and images_per_day 50. Each client loops over a
mix — streamed completions, chat, images, model listing, uploads — with one of the keys, until
the time is up. Prints requests/s, p50/p99 latency per route, the counts of 5xx (must be 0) and
429 answers, and the server's resident memory before and after (it should stay flat).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import LiveServer, admin_http, make_settings  # noqa: E402

POEM = "春眠不觉晓，处处闻啼鸟。\n\n床前明月光，疑是地上霜。\n".encode()


def rss_mb() -> float:
    """This process's resident memory now (the server runs in it), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_request(c: httpx.Client, route: str, rng: random.Random) -> int:
    if route == "completion stream":
        body = {"model": "tang-poet", "prompt": "春", "max_tokens": 16, "stream": True, "seed": rng.randrange(1 << 30)}
        with c.stream("POST", "/v1/completions", json=body) as r:
            for _ in r.iter_lines():
                pass
            return r.status_code
    if route == "chat":
        return c.post("/v1/chat/completions", json={"model": "tang-poet", "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "秋夜"}]}).status_code
    if route == "image":
        return c.post("/v1/images/generations", json={"model": "emoji-gan", "prompt": "red apple",
                                                      "seed": rng.randrange(1000), "store": False}).status_code
    if route == "models":
        return c.get("/v1/models").status_code
    return c.post("/v1/files", files={"file": (f"p{rng.randrange(10**9)}.txt", POEM + str(rng.random()).encode())},
                  data={"purpose": "fine-tune"}).status_code


ROUTES = ["completion stream"] * 4 + ["chat"] * 2 + ["image", "models", "models", "upload"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        settings = make_settings(Path(home) / "home", run_worker=False, threads=args.threads, max_tokens_limit=64,
                                 max_body_bytes=200_000, moderation="flag")
        with LiveServer(settings) as server, admin_http(server) as admin:
            secrets = []
            for name, limits in (("free", {}), ("rpm-120", {"rpm": 120}),
                                 ("parallel-2", {"max_parallel": 2, "images_per_day": 50})):
                secrets.append(admin.post("/api/keys", json={"name": name, "scopes": ["generate", "train"],
                                                             "limits": limits}).json()["key"])
            admin.post("/v1/completions", json={"model": "tang-poet", "prompt": "春", "max_tokens": 2})  # warm
            admin.post("/v1/images/generations", json={"model": "emoji-gan", "prompt": "apple", "store": False})
            before = rss_mb()
            latencies: dict[str, list[float]] = defaultdict(list)
            codes: dict[int, int] = defaultdict(int)
            lock = threading.Lock()
            deadline = time.monotonic() + args.seconds

            def client(i: int) -> None:
                rng = random.Random(i)
                headers = {"Authorization": f"Bearer {secrets[i % 3]}"}
                with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
                    while time.monotonic() < deadline:
                        route = rng.choice(ROUTES)
                        start = time.perf_counter()
                        try:
                            code = one_request(c, route, rng)
                        except httpx.HTTPError:
                            code = 599  # the connection failed: counted as a server error
                        with lock:
                            latencies[route].append(time.perf_counter() - start)
                            codes[code] += 1

            started = time.monotonic()
            workers = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.monotonic() - started
            after = rss_mb()
            verify = admin.get("/api/audit/verify").json()["ok"]
    total = sum(codes.values())
    print(f"{args.clients} clients × {args.seconds:.0f} s, 3 keys (one with rpm 120, one with max_parallel 2)")
    print(f"{total} requests, {total / elapsed:.1f} requests/s")
    print(f"{'route':>18} | {'count':>6} | {'p50 ms':>8} | {'p99 ms':>8}")
    for route, values in sorted(latencies.items()):
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"{route:>18} | {len(values):>6} | {statistics.median(values) * 1000:>8.0f} | {p99 * 1000:>8.0f}")
    errors = sum(n for code, n in codes.items() if code >= 500)
    print(f"status codes: {dict(sorted(codes.items()))}")
    print(f"5xx: {errors}   429: {codes.get(429, 0)}   audit chain ok: {verify}")
    print(f"process RSS: {before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB)")


if __name__ == "__main__":
    main()
