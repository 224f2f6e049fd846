"""Decode throughput: Atelier's text engine vs transformers' generate, same weights, same run.

    .venv/bin/python benchmarks/text_decode.py [--family chargpt|hf-causal-lm] [--model-dir DIR]
                                               [--new-tokens 128] [--repeats 3] [--step-threads N]
                                               [--kv-cache-dtype float32|float16]

Both sides generate exactly --new-tokens tokens per sequence (eos ignored), sampling at
temperature 1, from the prompt 春眠不觉晓，, at batch 1, 8 and 16. transformers loads the
folder with AutoModelForCausalLM (KV cache on); a chargpt folder is a Hugging Face GPT-2
folder too. --family picks how Atelier loads the same folder: `chargpt` (our own model
code) or `hf-causal-lm` (a model a user imports: transformers' modules, Atelier's slot KV
cache and scheduler) — so the second measures what an imported model gets.
Prints tokens/s for each, the ratio ours / transformers (higher is better for us), and
our aggregate tokens/s at batch 16 over batch 1. Both run one torch thread, transformers' fastest
setting here (two: 3x slower); our native step of 8 or more rows may split them between
--step-threads threads, by default every core, since nothing else runs (the server's default is
half the cores, config.step_threads). --kv-cache-dtype: what our KV cache holds (ATELIER_KV_CACHE_DTYPE;
float32 by default, as the server's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch

from atelier.common import native
from atelier.config import Settings, inference_threads
from atelier.families import get_family
from atelier.families.shipped import SHIPPED_DIR
from atelier.runtime.sampling import SamplingParams
from atelier.runtime.text_engine import Finished, Sequence, TextEngine

PROMPT = "春眠不觉晓，"


async def ours(engine: TextEngine, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    params = SamplingParams(temperature=1.0, ignore_eos=True)
    start = time.perf_counter()
    for i in range(batch):
        engine.submit(Sequence(index=i, prompt_ids=prompt_ids, params=params, max_tokens=new_tokens, stop=[],
                               seed=i, loop=loop, events=events))
    done, tokens = 0, 0
    while done < batch:
        _, event = await events.get()
        if isinstance(event, Finished):
            done += 1
            tokens += event.completion_tokens
    return tokens / (time.perf_counter() - start)


def theirs(hf, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    ids = torch.tensor([prompt_ids] * batch)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return (out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("chargpt", "hf-causal-lm"), default="chargpt")
    ap.add_argument("--model-dir", type=Path, default=SHIPPED_DIR / "tang-poet")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as the server, "
                                                               "half the cores)")
    ap.add_argument("--step-threads", type=int, default=os.cpu_count() or 1,
                    help="threads a native step of many rows may share (default: every core)")
    ap.add_argument("--kv-cache-dtype", choices=("float32", "float16"), default="float32",
                    help="what our engine's KV cache holds (ATELIER_KV_CACHE_DTYPE)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or inference_threads(Settings()))
    native.use(True, args.step_threads)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    lm = get_family(args.family).load(args.model_dir)  # as the server runs it
    engine = TextEngine(lm, max_batch=16, kv_dtype=args.kv_cache_dtype)
    prompt_ids = lm.encode(PROMPT)
    n = min(args.new_tokens, lm.context - len(prompt_ids))
    params = sum(p.numel() for p in hf.parameters())

    print(f"model {args.model_dir.name} as {args.family}: {params / 1e6:.2f} M parameters, "
          f"{n} new tokens per sequence, {torch.get_num_threads()} threads, {args.step_threads} step threads, "
          f"{args.kv_cache_dtype} KV cache, "
          f"best of {args.repeats}")
    print(f"{'batch':>5} | {'atelier tok/s':>13} | {'transformers tok/s':>18} | {'ratio':>5}")
    print("-" * 52)
    ours_at = {}
    for batch in (1, 8, 16):
        asyncio.run(ours(engine, prompt_ids, batch, 8))  # warm-up
        theirs(hf, prompt_ids, batch, 8)
        a = max(asyncio.run(ours(engine, prompt_ids, batch, n)) for _ in range(args.repeats))
        b = max(theirs(hf, prompt_ids, batch, n) for _ in range(args.repeats))
        ours_at[batch] = a
        print(f"{batch:>5} | {a:>13.0f} | {b:>18.0f} | {a / b:>5.2f}")
    print(f"aggregate at batch 16 / batch 1 (ours): {ours_at[16] / ours_at[1]:.2f}×")
    engine.close()


if __name__ == "__main__":
    main()
