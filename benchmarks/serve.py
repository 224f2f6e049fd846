"""Serving benchmark in the shape of `vllm bench serve`: the real server, streaming completions.

    .venv/bin/python benchmarks/serve.py [--model tang-poet] [--concurrency 1 8 32] [--requests N]
                                         [--max-tokens 64] [--rate R] [--threads N] [--passes 5]
                                         [--database sqlite|postgresql] [--runtime local|process|ray]
                                         [--kv-cache-dtype float32|float16]

Starts `atelier serve` as its own process on loopback with a fresh home, then for each
concurrency runs a closed loop (each client sends its next request when the last one ends;
with --rate, Poisson arrivals at R requests/s instead) of streaming `/v1/completions` with
`ignore_eos` (ten rounds per concurrency by default: a closed loop's first round is a burst, every
client at once, and equal lengths keep later rounds in step), and prints requests/s, output tokens/s,
time to first token (TTFT) p50/p99, time per output token (TPOT) p50/p99, inter-token latency (ITL) p99,
and tokens/s over concurrency 1's. In the same run: one stream through the server against the in-process
engine on the same weights (`--passes` alternating passes of 32 requests one after another each, medians),
`transformers` `generate`, a 1-token completion's round trip against the in-process call, and what the most
clients compute against this machine's fp32 matmul peak on one core. No assertions: the figures are for
people (issue "Performance").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import ADMIN_KEY, free_port, serve_process  # noqa: E402

PROMPT = "春眠不觉晓，"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def client_session(concurrency: int) -> aiohttp.ClientSession:
    """The load's HTTP client: aiohttp, as `vllm bench serve`'s. The client shares this machine with the
    server; httpx's streaming took 0.40 of a core at 32 clients, aiohttp's 0.15."""
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                 connector=aiohttp.TCPConnector(limit=concurrency + 4),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def sse_chunks(response: aiohttp.ClientResponse):
    """The JSON chunks of a streamed completion, as they arrive (`one` below looks at lines without parsing
    them: it shares the machine with the server it measures)."""
    async for line in response.content:
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])


async def one(client: aiohttp.ClientSession, url: str, model: str, max_tokens: int, seed: int) -> dict:
    """One streamed completion: when each chunk of text arrived, and how many tokens it held in all (the
    server sends what it has at once, so a chunk may carry several tokens when its client falls behind)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "seed": seed,
            "temperature": 1.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # one SSE line at a time
            if line.startswith(b'data: {"') and b'"text": ""' not in line and b'"choices": []' not in line:
                arrivals.append(time.perf_counter() - start)
            elif b'"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return {"arrivals": arrivals, "tokens": tokens, "latency": time.perf_counter() - start}


async def run_load(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                   rate: float | None) -> dict:
    async with client_session(concurrency) as client:
        results: list[dict] = []
        started = time.perf_counter()
        if rate is None:
            queue = iter(range(requests))

            async def worker():
                for seed in queue:
                    results.append(await one(client, url, model, max_tokens, seed))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng, tasks = random.Random(0), []
            for seed in range(requests):
                tasks.append(asyncio.create_task(one(client, url, model, max_tokens, seed)))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["arrivals"][0] for r in results if r["arrivals"]]
    tpot = [(r["latency"] - r["arrivals"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {"requests/s": len(results) / wall, "tokens/s": tokens / wall, "ttft_p50": pct(ttft, 0.5),
            "ttft_p99": pct(ttft, 0.99), "tpot_p50": pct(tpot, 0.5), "tpot_p99": pct(tpot, 0.99),
            "itl_p99": pct(itl, 0.99)}


async def round_trip(url: str, model: str, store: bool, n: int = 100) -> float:
    """Median seconds of a 1-token, non-streamed completion through the server (stored in the gallery, as
    by default, or not), one after another on one connection."""
    times = []
    async with client_session(1) as client:
        for i in range(n):
            t0 = time.perf_counter()
            async with client.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1,
                                                                  "seed": i, "store": store}) as r:
                r.raise_for_status()
                await r.read()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class InProcess:
    """The engine without HTTP, on the same weights and thread settings as the server, kept open for the whole
    run so its passes can alternate with the server's; and `transformers` `generate`."""

    def __init__(self, model: str, kv_dtype: str):
        import torch

        from atelier.families import get_family
        from atelier.families.shipped import SHIPPED_DIR
        from atelier.runtime.text_engine import TextEngine

        self.folder = SHIPPED_DIR / model
        self.lm = get_family("chargpt").load(self.folder)
        self.engine = TextEngine(self.lm, max_batch=16, kv_dtype=kv_dtype)
        self.ids = self.lm.encode(PROMPT)
        self.threads = torch.get_num_threads()
        self.requests(1, 8)  # warm up

    def requests(self, n: int, max_tokens: int) -> float:
        """Tokens/s of n requests one after another (ignore_eos: max_tokens each) on one event loop, over the
        wall time, as one client through the server is measured. (A loop per request, as before, added its
        start to every request's time: 0.17 ms of 18.5.)"""
        from text_decode import ours

        async def one_after_another():
            for _ in range(n):
                await ours(self.engine, self.ids, 1, max_tokens)

        start = time.perf_counter()
        asyncio.run(one_after_another())
        return n * max_tokens / (time.perf_counter() - start)

    def one_token(self) -> float:
        """Median seconds of a 1-token call, 30 on one event loop."""
        from text_decode import ours

        async def calls() -> list[float]:
            times = []
            for _ in range(30):
                start = time.perf_counter()
                await ours(self.engine, self.ids, 1, 1)
                times.append(time.perf_counter() - start)
            return times

        return statistics.median(asyncio.run(calls()))

    def close(self) -> None:
        self.engine.close()

    def transformers(self, max_tokens: int) -> dict:
        from text_decode import theirs
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(self.folder).eval()
        theirs(hf, self.ids, 1, 8)
        return {"hf_tps": max(theirs(hf, self.ids, 1, max_tokens) for _ in range(3)),
                "flop_per_token": 2 * sum(p.numel() for p in hf.parameters())}


def matmul_peak() -> float:
    """This machine's fp32 matmul on one core, GFLOP/s: the best of 512×512 by 512×512 products (MKL's sgemm,
    what the engine's products run on)."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    with torch.inference_mode():
        for _ in range(5):
            torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(30))
    return 2 * 512 ** 3 / best / 1e9


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tang-poet")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per concurrency level (default: ten rounds of it, at least 32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--passes", type=int, default=5,
                    help="alternating passes of the in-process engine and one client, for the single-stream ratio")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals (requests/s) instead of a closed loop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, here and in the server (default: the server's own, half the cores)")
    ap.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                    help="the server's database: SQLite in its home, or a throwaway PostgreSQL (tests/postgres.py)")
    ap.add_argument("--runtime", choices=("local", "process", "ray"), default="local",
                    help="where generation runs (ATELIER_RUNTIME): in the server, in an engine process per text "
                         "model, or on Ray Serve (a local cluster)")
    ap.add_argument("--kv-cache-dtype", choices=("float32", "float16"), default="float32",
                    help="what the engines' KV caches hold, here and in the server (ATELIER_KV_CACHE_DTYPE)")
    args = ap.parse_args()
    import torch

    from atelier.config import Settings, inference_threads

    torch.set_num_threads(args.threads or inference_threads(Settings()))  # as the server sets its own
    local = InProcess(args.model, args.kv_cache_dtype)
    single_n = args.requests or 32
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {"ATELIER_HOME": home, "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY,
                            "ATELIER_RUN_WORKER": "false", "ATELIER_MAX_TOKENS_LIMIT": str(max(512, args.max_tokens)),
                            "ATELIER_LOG_LEVEL": "warning"}
        if args.threads:
            env["ATELIER_THREADS"] = str(args.threads)
        env["ATELIER_RUNTIME"] = args.runtime
        env["ATELIER_KV_CACHE_DTYPE"] = args.kv_cache_dtype
        postgres = None
        if args.database == "postgresql":
            from postgres import Postgres

            postgres = Postgres()
            env["ATELIER_DATABASE_URL"] = postgres.create_database("serve_bench")
        proc = serve_process(env, port, timeout_s=180)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_load(url, args.model, 1, 2, 8, None))  # load the model, warm up
            one_token = local.one_token()
            rt, rt_unstored = (asyncio.run(round_trip(url, args.model, store)) for store in (True, False))
            # One stream, the engine's passes and one client's alternating: a pass is a second or so, and this
            # box's speed drifts over seconds (other tenants), so one pass of each compared luck, not paths.
            engine_passes, client_passes = [], []
            for _ in range(args.passes):
                engine_passes.append(local.requests(single_n, args.max_tokens))
                client_passes.append(asyncio.run(run_load(url, args.model, 1, single_n, args.max_tokens,
                                                          None))["tokens/s"])
            rows = {c: asyncio.run(run_load(url, args.model, c, args.requests or max(32, 10 * c), args.max_tokens,
                                            args.rate))
                    for c in args.concurrency}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            local.close()
            if postgres is not None:
                postgres.close()
    hf, peak = local.transformers(args.max_tokens), matmul_peak()
    base = rows[args.concurrency[0]]["tokens/s"]
    mode = f"Poisson {args.rate} req/s" if args.rate else "closed loop"
    print(f"\n{args.model}, {args.max_tokens} tokens per request, streaming, {mode}, {local.threads} threads, "
          f"{args.database}, runtime {args.runtime}, {args.kv_cache_dtype} KV cache")
    print(f"{'clients':>7} | {'req/s':>6} | {'tok/s':>7} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'TPOT p50':>8} | "
          f"{'TPOT p99':>8} | {'ITL p99':>7} | {'× c=1':>5}")
    print("-" * 92)
    for c, r in rows.items():
        print(f"{c:>7} | {r['requests/s']:>6.2f} | {r['tokens/s']:>7.0f} | {r['ttft_p50'] * 1e3:>6.0f}ms | "
              f"{r['ttft_p99'] * 1e3:>6.0f}ms | {r['tpot_p50'] * 1e3:>6.1f}ms | {r['tpot_p99'] * 1e3:>6.1f}ms | "
              f"{r['itl_p99'] * 1e3:>5.0f}ms | {r['tokens/s'] / base:>5.2f}")
    engine, single = statistics.median(engine_passes), statistics.median(client_passes)
    print(f"\none stream, {args.passes} alternating passes of {single_n} requests: the in-process engine "
          f"{engine:.0f} tok/s (median; {min(engine_passes):.0f}-{max(engine_passes):.0f}), one client through the "
          f"server {single:.0f} ({min(client_passes):.0f}-{max(client_passes):.0f}) = {single / engine:.0%} of the "
          f"engine's (pass by pass: {', '.join(f'{c / e:.0%}' for e, c in zip(engine_passes, client_passes))})")
    print(f"transformers generate, batch 1: {hf['hf_tps']:.0f} tok/s (engine / transformers "
          f"{engine / hf['hf_tps']:.2f}×)")
    print(f"1-token completion: {rt * 1e3:.1f} ms round trip, {rt_unstored * 1e3:.1f} ms with store=false, vs "
          f"{one_token * 1e3:.1f} ms in process (+{(rt - one_token) * 1e3:.1f} ms, "
          f"+{(rt_unstored - one_token) * 1e3:.1f} ms)")
    top = max(rows)
    if len(rows) > 1:
        print(f"{top} clients: {rows[top]['tokens/s'] / base:.1f}× one client's tokens/s; TTFT p99 "
              f"{rows[top]['ttft_p99'] / rows[args.concurrency[0]]['ttft_p50']:.1f}× the single-client TTFT")
    gflops = rows[top]["tokens/s"] * hf["flop_per_token"] / 1e9
    print(f"{top} clients compute {gflops:.0f} GFLOP/s (2 per parameter per token): {gflops / peak:.0%} "
          f"of one core's measured fp32 matmul peak ({peak:.0f} GFLOP/s), "
          f"{gflops / peak / (os.cpu_count() or 1):.0%} of the {os.cpu_count()} cores'")


if __name__ == "__main__":
    main()
