"""Streams decoding while long prompts arrive, with prompts prefilled whole and in chunks, through the real server.

    .venv/bin/python benchmarks/chunked_prefill.py [--chunks 4096 256 128] [--streams 4] [--long 4]
                                                   [--prompt-chars 1800] [--runtime local|process]
                                                   [--model-dir DIR]

Starts `atelier serve` on loopback with a fresh home once per ATELIER_PREFILL_CHUNK in `--chunks` (4096, the
most a forward takes, prefills any prompt of this model whole, as the engine did before chunked prefill). In
each, `--streams` clients stream completions of short prompts one after another (closed loop), while one more
client sends `--long` prompts of `--prompt-chars` characters, each a second after the last one's answer. Prints,
per chunk size: the streams' inter-token latency (ITL: the gap between two chunks of text; p50, p99, the longest),
their tokens/s, and the long prompts' time to first token (TTFT), measured in the same run. A chunk's gap is
divided among the tokens it carries (`logprobs` lists them): a byte-level token may end inside a character,
whose text waits for the next token, and a gap that spans two steps is two tokens' wait. The model is a Qwen2
of random weights (24 M parameters, grouped-query attention, 2,048 positions; benchmarks/prefix_cache.py builds
it: what it writes is noise, what it costs is a real model's), or `--model-dir`, a local Hugging Face folder. No
assertions: the figures are for people (issue "Performance").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import ADMIN_KEY, free_port, serve_process  # noqa: E402
from prefix_cache import LINES, random_qwen2  # noqa: E402
from serve import client_session, pct, sse_chunks  # noqa: E402


async def streamed(client, url: str, model: str, prompt: str, max_tokens: int, seed: int
                   ) -> tuple[list[tuple[float, int]], int]:
    """One streamed completion: when each chunk of text arrived (perf_counter) and how many tokens it carried,
    the request's start first; and its prompt's tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "ignore_eos": True, "logprobs": 1, "stream_options": {"include_usage": True}}
    arrivals, prompt_tokens = [(time.perf_counter(), 0)], 0
    async with client.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk["choices"]:
                if choice["logprobs"] and choice["logprobs"]["tokens"]:
                    arrivals.append((time.perf_counter(), len(choice["logprobs"]["tokens"])))
    return arrivals, prompt_tokens


def long_prompt(args, at: int) -> str:
    """`--prompt-chars` characters of verse from character `at` on."""
    verse = "".join(LINES)
    return "".join(verse[(at + k) % len(verse)] for k in range(args.prompt_chars))


async def load(url: str, model: str, args) -> dict:
    """The streams and the long prompts together, until the last long prompt has its answer."""
    done, gaps, tokens, ttfts, sizes = asyncio.Event(), [], [0], [], []

    async def stream(client, s: int):
        n = 0
        while not done.is_set():
            arrivals, _ = await streamed(client, url, model, LINES[s % len(LINES)], args.stream_tokens,
                                         seed=1000 * s + n)
            gaps.extend((b - a) / n for (a, _), (b, n) in zip(arrivals[1:], arrivals[2:]))
            tokens[0] += sum(n for _, n in arrivals)
            n += 1

    async def long_prompts(client):
        await asyncio.sleep(1.0)  # the streams are running
        for i in range(args.long):
            arrivals, size = await streamed(client, url, model, long_prompt(args, 7 * (i + 1)), 4, seed=i)
            ttfts.append(arrivals[1][0] - arrivals[0][0])
            sizes.append(size)
            await asyncio.sleep(1.0)
        done.set()

    async with client_session(args.streams + 1) as client:
        start = time.perf_counter()
        await asyncio.gather(long_prompts(client), *(stream(client, s) for s in range(args.streams)))
        wall = time.perf_counter() - start
    return {"itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99), "itl_max": max(gaps),
            "tok/s": tokens[0] / wall, "ttft": statistics.median(ttfts), "ttft_max": max(ttfts),
            "prompt_tokens": statistics.median(sizes)}


def run(chunk: int, args) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {"ATELIER_HOME": home, "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY,
                            "ATELIER_RUN_WORKER": "false", "ATELIER_LOG_LEVEL": "warning",
                            "ATELIER_MAX_TOKENS_LIMIT": "4096", "ATELIER_MAX_PROMPT_CHARS": "100000",
                            "ATELIER_MAX_UPLOAD_BYTES": str(2**31), "ATELIER_RUNTIME": args.runtime,
                            "ATELIER_PREFILL_CHUNK": str(chunk)}
        proc = serve_process(env, port, timeout_s=180)
        url, model = f"http://127.0.0.1:{port}", "bench-lm"
        try:
            # imported as a user imports a folder: `atelier models import`
            subprocess.run([sys.executable, "-m", "atelier.cli", "models", "import", str(args.model_dir), "--name",
                            model], env=env | {"ATELIER_URL": url, "ATELIER_API_KEY": ADMIN_KEY}, check=True,
                           stdout=subprocess.DEVNULL)

            async def warm_up():  # the model loaded, a long prompt's first pass done
                async with client_session(1) as client:
                    await streamed(client, url, model, long_prompt(args, 3), 8, seed=0)

            asyncio.run(warm_up())
            return asyncio.run(load(url, model, args))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4096, 256, 128],
                    help="ATELIER_PREFILL_CHUNK values to compare (4096: whole prompts)")
    ap.add_argument("--streams", type=int, default=4, help="clients streaming short prompts meanwhile")
    ap.add_argument("--stream-tokens", type=int, default=200, help="tokens each streamed completion asks for")
    ap.add_argument("--long", type=int, default=4, help="long prompts sent, one after another")
    ap.add_argument("--prompt-chars", type=int, default=1800, help="characters of verse in a long prompt")
    ap.add_argument("--runtime", choices=("local", "process"), default="process")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a local Hugging Face folder to import (default: a random 24 M-parameter Qwen2)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        name = args.model_dir
        if args.model_dir is None:
            args.model_dir, name = random_qwen2(Path(scratch)), "a random 24 M-parameter Qwen2"
        rows = {chunk: run(chunk, args) for chunk in args.chunks}
    print(f"\n{name}, runtime {args.runtime}: {args.streams} clients streaming {args.stream_tokens}-token completions "
          f"while {args.long} prompts of {args.prompt_chars} characters ({rows[args.chunks[0]]['prompt_tokens']:.0f} "
          f"tokens) arrive one after another")
    print(f"{'prefill chunk':>13} | {'ITL p50':>8} | {'ITL p99':>8} | {'ITL max':>8} | {'streams tok/s':>13} | "
          f"{'long TTFT':>9} | {'longest':>8}")
    print("-" * 86)
    for chunk, r in rows.items():
        print(f"{chunk:>13} | {r['itl_p50'] * 1e3:>6.1f}ms | {r['itl_p99'] * 1e3:>6.1f}ms | {r['itl_max'] * 1e3:>6.0f}ms | "
              f"{r['tok/s']:>13.0f} | {r['ttft'] * 1e3:>7.0f}ms | {r['ttft_max'] * 1e3:>6.0f}ms")
    base = rows[args.chunks[0]]
    for chunk, r in list(rows.items())[1:]:
        print(f"chunk {chunk} against {args.chunks[0]}: the streams' longest wait {base['itl_max'] / r['itl_max']:.1f}× "
              f"shorter, their ITL p99 {r['itl_p99'] / base['itl_p99']:.1f}× longer (more of their steps carry a "
              f"chunk), the long prompts' TTFT {r['ttft'] / base['ttft']:.2f}×")


if __name__ == "__main__":
    main()
