"""Decode throughput: Atelier's text engine vs transformers' generate, same weights, same run.

    .venv/bin/python benchmarks/text_decode.py [--model-dir DIR] [--new-tokens 128] [--repeats 3]

Both sides generate exactly --new-tokens tokens per sequence (eos ignored), sampling at
temperature 1, from the prompt 春眠不觉晓，, at batch 1 and batch 8. transformers loads the
exported Hugging Face GPT-2 folder of the same version (GPT2LMHeadModel, KV cache on).
Prints tokens/s for each and the ratio ours / transformers (higher is better for us).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from atelier.models.chargpt import from_pretrained
from atelier.families.shipped import SHIPPED_DIR
from atelier.runtime.sampling import SamplingParams
from atelier.families.chargpt import family as chargpt_family
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
    ap.add_argument("--model-dir", type=Path, default=SHIPPED_DIR / "tang-poet")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2LMHeadModel

    model, tok = from_pretrained(args.model_dir)
    hf = GPT2LMHeadModel.from_pretrained(args.model_dir).eval()
    engine = TextEngine(chargpt_family.load(args.model_dir), max_batch=16)  # as the server runs it
    prompt_ids = [tok.bos_id] + tok.encode(PROMPT)
    n = min(args.new_tokens, model.config.n_positions - len(prompt_ids))

    print(f"model {args.model_dir.name}: {model.config.n_params / 1e6:.2f} M parameters, "
          f"{n} new tokens per sequence, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'batch':>5} | {'atelier tok/s':>13} | {'transformers tok/s':>18} | {'ratio':>5}")
    print("-" * 52)
    for batch in (1, 8):
        asyncio.run(ours(engine, prompt_ids, batch, 8))  # warm-up
        theirs(hf, prompt_ids, batch, 8)
        a = max(asyncio.run(ours(engine, prompt_ids, batch, n)) for _ in range(args.repeats))
        b = max(theirs(hf, prompt_ids, batch, n) for _ in range(args.repeats))
        print(f"{batch:>5} | {a:>13.0f} | {b:>18.0f} | {a / b:>5.2f}")
    engine.close()


if __name__ == "__main__":
    main()
