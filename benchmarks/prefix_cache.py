"""A conversation's turns with and without prefix caching, through the real server.

    .venv/bin/python benchmarks/prefix_cache.py [--conversations 6] [--answer-tokens 16] [--new-chars 6]
                                                [--runtime local|process] [--model-dir DIR | --random-qwen2]

Starts `atelier serve` on loopback with a fresh home twice, ATELIER_PREFIX_CACHE=true and then false.
In each, one client holds conversations one after another: every turn is a streamed completion whose
prompt is the conversation so far (the last prompt, its answer, `--new-chars` more characters of verse),
until the prompt no longer fits the model's context. Prints, turn by turn, the prompt's tokens, how many the
server found cached, and the median time to first token (TTFT) with the cache and without, measured in the
same run. `tang-poet` has 192 positions; for longer prompts, `--model-dir` imports a local Hugging Face
folder, and `--random-qwen2` builds one (24 M parameters of random weights, grouped-query attention, 2,048
positions, a byte-level BPE tokenizer trained here: what it writes is noise, what it costs is a real
model's). No assertions: the figures are for people (issue "Performance").
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
from serve import client_session, sse_chunks  # noqa: E402

LINES = ["床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。", "白日依山尽，", "黄河入海流。", "欲穷千里目，",
         "更上一层楼。"]


async def turn(client, url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict | None:
    """One streamed completion: its TTFT, answer and usage; None once the prompt does not fit."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, ttft, text, usage = time.perf_counter(), None, "", None
    async with client.post(url + "/v1/completions", json=body) as r:
        if r.status == 400:
            return None
        r.raise_for_status()
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["text"] and ttft is None:
                    ttft = time.perf_counter() - start
                text += choice["text"]
    return {"ttft": ttft, "text": text, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def conversations(url: str, model: str, n: int, max_tokens: int, new_chars: int) -> list[list[dict]]:
    verse = "".join(LINES)
    out = []
    async with client_session(1) as client:
        for c in range(n):
            at = 6 * c  # each conversation starts at another line
            prompt, turns = "", []
            while True:
                prompt += "".join(verse[(at + i) % len(verse)] for i in range(new_chars))
                at += new_chars
                t = await turn(client, url, model, prompt, max_tokens, seed=100 * c + len(turns))
                if t is None:
                    break
                turns.append(t)
                prompt += t["text"]
            out.append(turns)
    return out


def random_qwen2(folder: Path) -> Path:
    """A Qwen2 of random weights (24 M parameters) and a byte-level BPE tokenizer trained on the verse above."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    verse = "".join(LINES)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([verse[i:] + verse[:i] for i in range(len(verse))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(fast), hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                         max_position_embeddings=2048, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def run(prefix_cache: bool, args) -> list[list[dict]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {"ATELIER_HOME": home, "ATELIER_PORT": str(port), "ATELIER_ADMIN_KEY": ADMIN_KEY,
                            "ATELIER_RUN_WORKER": "false", "ATELIER_LOG_LEVEL": "warning",
                            "ATELIER_MAX_TOKENS_LIMIT": "4096", "ATELIER_MAX_PROMPT_CHARS": "100000",
                            "ATELIER_MAX_UPLOAD_BYTES": str(2**31),
                            "ATELIER_RUNTIME": args.runtime, "ATELIER_PREFIX_CACHE": str(prefix_cache).lower()}
        proc = serve_process(env, port, timeout_s=180)
        url, model = f"http://127.0.0.1:{port}", "tang-poet"
        try:
            if args.model_dir:
                model = "bench-lm"  # imported as a user imports a folder: `atelier models import`
                subprocess.run([sys.executable, "-m", "atelier.cli", "models", "import", str(args.model_dir), "--name",
                                model], env=env | {"ATELIER_URL": url, "ATELIER_API_KEY": ADMIN_KEY}, check=True)
            asyncio.run(conversations(url, model, 1, 4, 200))  # load the model, warm up
            return asyncio.run(conversations(url, model, args.conversations, args.answer_tokens, args.new_chars))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--new-chars", type=int, default=6, help="characters of verse each turn adds to the prompt")
    ap.add_argument("--runtime", choices=("local", "process"), default="local")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model-dir", type=Path, default=None,
                       help="a local Hugging Face folder (config, weights, tokenizer) to import instead of tang-poet")
    which.add_argument("--random-qwen2", action="store_true", help="build a 24 M-parameter Qwen2 and import it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        name = args.model_dir or "tang-poet"
        if args.random_qwen2:
            args.model_dir, name = random_qwen2(Path(scratch)), "a random 24 M-parameter Qwen2"
        cached, whole = run(True, args), run(False, args)
    print(f"\n{name}, {args.conversations} conversations, {args.answer_tokens}-token answers, {args.new_chars} "
          f"characters more a turn, runtime {args.runtime}; TTFT medians over the conversations")
    print(f"{'turn':>4} | {'prompt':>6} | {'cached':>6} | {'TTFT cached':>11} | {'TTFT whole':>10} | {'whole / cached':>14}")
    print("-" * 64)
    ratios = []
    for i in range(min(len(c) for c in cached + whole)):
        with_cache = statistics.median(c[i]["ttft"] for c in cached)
        without = statistics.median(c[i]["ttft"] for c in whole)
        prompt = statistics.median(c[i]["prompt"] for c in cached)
        found = statistics.median(c[i]["cached"] for c in cached)
        ratios.append(without / with_cache)
        print(f"{i + 1:>4} | {prompt:>6.0f} | {found:>6.0f} | {with_cache * 1e3:>9.2f}ms | {without * 1e3:>8.2f}ms | "
              f"{without / with_cache:>13.2f}×")
    print(f"\nwithout the cache, every turn computed its whole prompt (cached tokens: "
          f"{max(t['cached'] for c in whole for t in c)}); from the second turn on, TTFT "
          f"{statistics.median(ratios[1:]) if len(ratios) > 1 else float('nan'):.2f}× lower with it (median)")


if __name__ == "__main__":
    main()
