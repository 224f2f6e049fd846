"""What each compression of `tang-poet` buys and costs: original, int8, distilled, pruned.

    .venv/bin/python benchmarks/compress_eval.py [--steps 1400] [--n 40] [--workdir runs/compress]
                                                 [--keep 0.5] [--student 96 3 3] [--threads 1]

Builds the three compressed versions with the code the API runs (atelier/training/compress.py):
int8 (`quantize_folder`), a distilled student (`--student` n_embd n_layer n_head, trained on the
teacher's corpus with the teacher's softened outputs) and a pruned model (half its MLP channels by
default, then fine-tuned while distilling from the original), the last two for `--steps` steps of
the teacher's own batch size, checkpointed in `--workdir` so a cut-off run resumes. Then, for each
version: weights on disk, resident memory of a process that loads it, decoding tokens/s at batch 1
and 16 (the engine, as served), validation bits per character on the teacher's held-out poems, and
from benchmarks/poetry_eval.py the compliance and distinct-2 of `--n` composed 五绝 and 七律.
A compressed version is worth shipping only where this table says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from atelier.families.shipped import SHIPPED_DIR  # noqa: E402
from atelier.models.chargpt import CharGPT, ChargptConfig, from_pretrained  # noqa: E402
from atelier.training.compress import prune_mlp, quantize_folder, sample_windows  # noqa: E402
from atelier.training.corpus import load_corpus  # noqa: E402
from atelier.training.run import train_chargpt  # noqa: E402
from atelier.training.trainer import TrainConfig, encode_stream  # noqa: E402

TEACHER = SHIPPED_DIR / "tang-poet"
DATA = ROOT.parent / "shared" / "data" / "poetry"
FORMS = ("wujue", "qilv")

RSS_PROBE = """
import resource, sys
from atelier.families import get_family
def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
before = rss()
lm = get_family('chargpt').load(__import__('pathlib').Path(sys.argv[1]))
print(rss() - before, rss())
"""


def train_cfg(steps: int, record: dict, *, fine_tune: bool) -> TrainConfig:
    t = record["train_config"]
    return TrainConfig(max_steps=steps, batch_size=t["batch_size"], lr=3e-4 if fine_tune else t["lr"],
                       warmup_steps=min(100, steps // 10), eval_every=max(1, steps // 7), patience=100,
                       seed=1337, distill_alpha=0.5, distill_temperature=2.0)


def build(args, workdir: Path) -> dict[str, Path]:
    record = json.loads((TEACHER / "training.json").read_text(encoding="utf-8"))
    teacher, tok = from_pretrained(TEACHER)
    folders = {"original": TEACHER}
    folders["int8"] = workdir / "int8"
    if not (folders["int8"] / "model.safetensors").exists():
        quantize_folder(TEACHER, folders["int8"])
    corpus = load_corpus(DATA)
    block = teacher.config.n_positions
    progress = lambda name: lambda e: e.get("type") in ("eval", "resumed", "done") and print(  # noqa: E731
        f"  {name}: {e.get('type')} step {e.get('step')} {('val_loss %.3f' % e['val_loss']) if 'val_loss' in e else ''}",
        flush=True)
    n_embd, n_layer, n_head = args.student
    student = CharGPT(ChargptConfig(vocab_size=len(tok), n_positions=block, n_embd=n_embd, n_layer=n_layer,
                                    n_head=n_head))
    windows = sample_windows(corpus.train, tok, block)
    plans = {"distilled": ((student, tok), False), "pruned": ((prune_mlp(teacher, args.keep, windows), tok), True)}
    for name, (start, fine_tune) in plans.items():
        best = workdir / name / "best"
        if (best / "training.json").exists():
            folders[name] = best
            continue
        print(f"training {name}: {start[0].config.n_params:,} parameters, {args.steps} steps", flush=True)
        folders[name] = train_chargpt(DATA, workdir / name, {}, train_cfg(args.steps, record, fine_tune=fine_tune),
                                      on_event=progress(name), start=start, teacher=teacher, method=name)
    return folders


@torch.no_grad()
def bits_per_char(folder: Path, corpus, windows: int = 64) -> float:
    model, tok = from_pretrained(folder)
    stream = encode_stream(corpus.val, tok)
    block = model.config.n_positions
    starts = torch.linspace(0, len(stream) - block - 1, steps=windows).long().tolist()
    total = 0.0
    for i in range(0, len(starts), 16):
        idx = torch.stack([stream[s:s + block + 1] for s in starts[i:i + 16]])
        total += float(model(idx[:, :-1], idx[:, 1:])[1]) * idx.shape[0]
    return total / len(starts) / math.log(2)


def decode_speed(folder: Path) -> tuple[float, float]:
    from text_decode import ours

    from atelier.families import get_family
    from atelier.runtime.text_engine import TextEngine

    lm = get_family("chargpt").load(folder)
    engine = TextEngine(lm, 16)
    ids = lm.encode("春眠不觉晓，")
    try:
        asyncio.run(ours(engine, ids, 1, 16))
        one = max(asyncio.run(ours(engine, ids, 1, 128)) for _ in range(3))
        sixteen = max(asyncio.run(ours(engine, ids, 16, 64)) for _ in range(2))
    finally:
        engine.close()
    return one, sixteen


def poems(folder: Path, n: int) -> dict:
    from poetry_eval import composed, compliance, distinct

    model, tok = from_pretrained(folder)
    out = {}
    for form in FORMS:
        made, _, _ = composed(model, tok, form, n, random.Random(0))
        out[form] = {"compliant": compliance(form, made)["compliant"],
                     "distinct2": distinct([p for p in made if p])[1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1400, help="training steps of the distilled and pruned models")
    ap.add_argument("--n", type=int, default=40, help="composed poems per form")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "compress")
    ap.add_argument("--keep", type=float, default=0.5, help="share of MLP channels the pruned model keeps")
    ap.add_argument("--student", type=int, nargs=3, default=[96, 3, 3], metavar=("N_EMBD", "N_LAYER", "N_HEAD"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = build(args, args.workdir)
    corpus = load_corpus(DATA)
    rows = {}
    for name, folder in folders.items():
        started = time.time()
        weights = (folder / "model.safetensors").stat().st_size
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder)], capture_output=True, text=True,
                               check=True, cwd=ROOT)
        loaded, rss = (int(x) for x in probe.stdout.split())
        one, sixteen = decode_speed(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        params = from_pretrained(folder)[0].config.n_params
        rows[name] = {"params": params, "weights_mb": weights / 1e6, "load_mb": loaded / 1e6, "rss_mb": rss / 1e6,
                      "tok_s_1": one, "tok_s_16": sixteen, "bpc": bits_per_char(folder, corpus),
                      "poems": poems(folder, args.n), "quantized": "atelier_quantization" in config}
        print(f"measured {name} in {time.time() - started:.0f} s", flush=True)
    base = rows["original"]
    print(f"\ntang-poet compressed ({args.threads} thread(s); {args.n} composed poems per form; distilled and "
          f"pruned trained {args.steps} steps)")
    print(f"{'version':<10} | {'params':>9} | {'weights':>8} | {'+RSS':>7} | {'tok/s b1':>8} | {'tok/s b16':>9} | "
          f"{'bits/char':>9} | {'五绝 ok':>7} | {'七律 ok':>7} | {'distinct-2':>10}")
    print("-" * 112)
    for name, r in rows.items():
        d2 = sum(r["poems"][f]["distinct2"] for f in FORMS) / len(FORMS)
        print(f"{name:<10} | {r['params']:>9,} | {r['weights_mb']:>6.1f}MB | {r['load_mb']:>5.0f}MB | "
              f"{r['tok_s_1']:>8.0f} | {r['tok_s_16']:>9.0f} | {r['bpc']:>9.3f} | "
              f"{r['poems']['wujue']['compliant']:>7.0%} | {r['poems']['qilv']['compliant']:>7.0%} | {d2:>10.3f}")
    print("\nratios to the original:")
    for name, r in rows.items():
        if name == "original":
            continue
        print(f"  {name:<10} weights ×{r['weights_mb'] / base['weights_mb']:.2f}, tok/s b1 ×{r['tok_s_1'] / base['tok_s_1']:.2f},"
              f" b16 ×{r['tok_s_16'] / base['tok_s_16']:.2f}, bits/char {r['bpc'] - base['bpc']:+.3f}")


if __name__ == "__main__":
    main()
