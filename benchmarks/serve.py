"""Serving benchmark in the shape of `vllm bench serve`: the real server, streaming completions.

    .venv/bin/python benchmarks/serve.py [--model tang-poet] [--concurrency 1 8 32] [--requests N]
                                         [--max-tokens 64] [--rate R] [--threads N]
                                         [--database sqlite|postgresql] [--runtime local|process|ray]
                                         [--kv-cache-dtype float32|float16]

Starts `atelier serve` as its own process on loopback with a fresh home, then for each
concurrency runs a closed loop (each client sends its next request when the last one ends;
with --rate, Poisson arrivals at R requests/s instead) of streaming `/v1/completions` with
`ignore_eos` (ten rounds per concurrency by default: a closed loop's first round is a burst, every
client at once, and equal lengths keep later rounds in step), and prints requests/s, output tokens/s, time to first token (TTFT) p50/p99,
time per output token (TPOT) p50/p99, inter-token latency (ITL) p99, and tokens/s over
concurrency 1's. In the same run: the in-process engine (batch 1, as many requests one after another as the server's first concurrency gets) and `transformers`
`generate` on the same weights, and a 1-token completion's round trip against the
in-process call, and what the most clients compute against this machine's fp32 matmul peak on one core,
measured in the same run. No assertions: the figures are for people (issue "Performance").
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


def in_process(model: str, max_tokens: int, requests: int, kv_dtype: str = "float32") -> dict:
    """The engine without HTTP (batch 1 tokens/s, a 1-token call) and transformers generate, same weights."""
    import torch
    from text_decode import ours, theirs
    from transformers import AutoModelForCausalLM

    from atelier.families import get_family
    from atelier.families.shipped import SHIPPED_DIR
    from atelier.runtime.text_engine import TextEngine

    folder = SHIPPED_DIR / model
    lm = get_family("chargpt").load(folder)
    engine = TextEngine(lm, max_batch=16, kv_dtype=kv_dtype)
    ids = lm.encode(PROMPT)
    asyncio.run(ours(engine, ids, 1, 8))
    # As one client through the server is measured: its requests one after another, all tokens over the wall
    # time (this was the best of three requests, against the server's whole run).
    start = time.perf_counter()
    for _ in range(requests):
        asyncio.run(ours(engine, ids, 1, max_tokens))  # ignore_eos: max_tokens each
    engine_tps = requests * max_tokens / (time.perf_counter() - start)
    one_token = []
    for _ in range(30):
        t0 = time.perf_counter()
        asyncio.run(ours(engine, ids, 1, 1))
        one_token.append(time.perf_counter() - t0)
    engine.close()
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs(hf, ids, 1, 8)
    hf_tps = max(theirs(hf, ids, 1, max_tokens) for _ in range(3))
    return {"engine_tps": engine_tps, "one_token": statistics.median(one_token), "hf_tps": hf_tps,
            "threads": torch.get_num_threads(), "flop_per_token": 2 * sum(p.numel() for p in hf.parameters()),
            "peak_gflops": matmul_peak()}


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
    local = in_process(args.model, args.max_tokens, args.requests or max(32, 10 * args.concurrency[0]),
                       args.kv_cache_dtype)
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
            rt, rt_unstored = (asyncio.run(round_trip(url, args.model, store)) for store in (True, False))
            rows = {c: asyncio.run(run_load(url, args.model, c, args.requests or max(32, 10 * c), args.max_tokens,
                                            args.rate))
                    for c in args.concurrency}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            if postgres is not None:
                postgres.close()
    base = rows[args.concurrency[0]]["tokens/s"]
    mode = f"Poisson {args.rate} req/s" if args.rate else "closed loop"
    print(f"\n{args.model}, {args.max_tokens} tokens per request, streaming, {mode}, {local['threads']} threads, "
          f"{args.database}, runtime {args.runtime}, {args.kv_cache_dtype} KV cache")
    print(f"{'clients':>7} | {'req/s':>6} | {'tok/s':>7} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'TPOT p50':>8} | "
          f"{'TPOT p99':>8} | {'ITL p99':>7} | {'× c=1':>5}")
    print("-" * 92)
    for c, r in rows.items():
        print(f"{c:>7} | {r['requests/s']:>6.2f} | {r['tokens/s']:>7.0f} | {r['ttft_p50'] * 1e3:>6.0f}ms | "
              f"{r['ttft_p99'] * 1e3:>6.0f}ms | {r['tpot_p50'] * 1e3:>6.1f}ms | {r['tpot_p99'] * 1e3:>6.1f}ms | "
              f"{r['itl_p99'] * 1e3:>5.0f}ms | {r['tokens/s'] / base:>5.2f}")
    single = rows.get(1, rows[args.concurrency[0]])["tokens/s"]
    print(f"\nin-process engine, batch 1: {local['engine_tps']:.0f} tok/s; transformers generate: "
          f"{local['hf_tps']:.0f} tok/s (engine / transformers {local['engine_tps'] / local['hf_tps']:.2f}×)")
    print(f"through the server, 1 client: {single:.0f} tok/s = {single / local['engine_tps']:.0%} of the engine's")
    print(f"1-token completion: {rt * 1e3:.1f} ms round trip, {rt_unstored * 1e3:.1f} ms with store=false, vs "
          f"{local['one_token'] * 1e3:.1f} ms in process (+{(rt - local['one_token']) * 1e3:.1f} ms, "
          f"+{(rt_unstored - local['one_token']) * 1e3:.1f} ms)")
    top = max(rows)
    if len(rows) > 1:
        print(f"{top} clients: {rows[top]['tokens/s'] / base:.1f}× one client's tokens/s; TTFT p99 "
              f"{rows[top]['ttft_p99'] / rows[args.concurrency[0]]['ttft_p50']:.1f}× the single-client TTFT")
    gflops = rows[top]["tokens/s"] * local["flop_per_token"] / 1e9
    print(f"{top} clients compute {gflops:.0f} GFLOP/s (2 per parameter per token): {gflops / local['peak_gflops']:.0%} "
          f"of one core's measured fp32 matmul peak ({local['peak_gflops']:.0f} GFLOP/s), "
          f"{gflops / local['peak_gflops'] / (os.cpu_count() or 1):.0%} of the {os.cpu_count()} cores'")


if __name__ == "__main__":
    main()
