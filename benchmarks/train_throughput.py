"""Training throughput: the job runner vs a plain training loop, fp32 and bf16, against the matmul peak.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--bf16-steps 2] [--image-steps 20] [--threads N]

Same model (tang-poet's shape: 192 wide, 6 layers, 192 context), same data (宋词三百首
from ../shared/data), same batch, in one run:
- plain loop: windows → forward → backward → AdamW step, nothing else (nanoGPT's loop)
- job runner: a real fine-tuning job row run by `atelier.jobs.runner.run_job`, the code
  the worker runs (events to SQLite, checkpoints, evaluation)
tokens/s of each, their ratio, and the share of the machine's matmul peak (measured here,
best of 5 square matmuls) that 6·N FLOPs per token reach. bf16 uses CPU autocast.
Then images/s for emoji-diffusion's shape: the trainer's bare optimiser step against a
ddpm job run by the job runner, on the emoji set (32×32 base designs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "poetry" / "songci300.jsonl"
SHAPE = dict(n_embd=192, n_layer=6, n_head=6, context=192)
BATCH = 20
BATCH_IMAGES = 32


def matmul_peak(dtype) -> float:
    """Best of several timed square matmuls (1024² fp32; 512² bf16, which is slow without AVX512-BF16)."""
    size = 1024 if dtype == torch.float32 else 512
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 2 * size**3 * 4 / (time.perf_counter() - start) / 1e9)
    return best


def corpus_file(folder: Path) -> Path:
    path = folder / "songci300.jsonl"
    with open(DATA, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as out:
        for line in src:
            rec = json.loads(line)
            out.write(json.dumps({"text": rec["rhythmic"] + "\n" + "".join(rec["paragraphs"])}, ensure_ascii=False) + "\n")
    return path


def plain_loop(path: Path, steps: int, bf16: bool) -> tuple[float, int]:
    from atelier.models.chargpt import CharGPT, ChargptConfig
    from atelier.models.tokenizer import CharTokenizer
    from atelier.training.corpus import load_corpus
    from atelier.training.trainer import encode_stream

    corpus = load_corpus(path)
    tok = CharTokenizer.train(corpus.train)
    stream = encode_stream(corpus.train, tok)
    block = SHAPE["context"]
    model = CharGPT(ChargptConfig(vocab_size=len(tok), n_positions=block, n_embd=SHAPE["n_embd"],
                                  n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def step():
        starts = torch.randint(0, len(stream) - block - 1, (BATCH,), generator=g).tolist()
        idx = torch.stack([stream[s: s + block + 1] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * block / (time.perf_counter() - start), model.config.n_params


def job_runner(path: Path, steps: int, bf16: bool) -> float:
    from atelier.config import Settings
    from atelier.jobs import store
    from atelier.jobs.runner import run_job
    from atelier.storage.db import File, JobEvent, make_engine, make_sessionmaker
    from atelier.storage.blobs import open_blobs

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), shipped_models=False)
        sessions = make_sessionmaker(make_engine(settings.db_url))
        blobs = open_blobs(settings)
        data = path.read_bytes()
        digest = blobs.put_bytes(data)
        with sessions() as db:
            db.add(File(id="file-bench", filename=path.name, purpose="fine-tune", format="jsonl-text",
                        records=300, bytes=len(data), sha256=digest))
            db.commit()
            hyper = SHAPE | {"batch_size": BATCH, "max_steps": steps, "eval_every": steps,
                             "precision": "bf16" if bf16 else "fp32"}
            job = store.create_job(db, base_model="chargpt", family="chargpt", suffix="bench",
                                   training_file="file-bench", hyperparameters=hyper, seed=0)
        run_job(job.id, settings=settings, sessions=sessions, blobs=blobs, shutting_down=threading.Event())
        with sessions() as db:
            rates = [e.data["tokens_per_s"] for e in db.query(JobEvent).filter_by(job_id=job.id)
                     if "tokens_per_s" in e.data]
            status = db.get(store.Job, job.id).status
        if status != "succeeded" or not rates:
            raise RuntimeError(f"benchmark job ended {status}")
        return sorted(rates)[len(rates) // 2]  # the median window (the first includes warm-up)


EMOJI = ROOT.parent / "shared" / "data" / "images" / "emoji64"


def image_rates(folder: Path, steps: int) -> tuple[float, float]:
    """emoji-diffusion's shape on 32×32 emoji: (bare optimiser steps, job runner) in images/s."""
    import numpy as np

    from atelier.config import Settings
    from atelier.jobs import store
    from atelier.jobs.runner import run_job
    from atelier.storage.db import File, JobEvent, make_engine, make_sessionmaker
    from atelier.storage.blobs import open_blobs
    from atelier.training.image_data import load_emoji, sample_batch
    from atelier.training.image_trainer import ImageTrainConfig, ImageTrainer

    train, _, _ = load_emoji(EMOJI)
    path = folder / "emoji.npz"
    np.savez(path, images=train.images, names=np.array(train.names))
    # bare: the trainer's own optimiser step, nothing around it (no EMA, events, eval, checkpoints)
    cfg = ImageTrainConfig(family="ddpm", max_steps=steps, batch_size=BATCH_IMAGES, eval_every=10**6)
    bare = ImageTrainer(cfg, folder / "bare", data=path)
    g = torch.Generator().manual_seed(0)
    batches = [sample_batch(bare.train_set, bare.vocab, BATCH_IMAGES, g, max_words=bare.model.config.max_words)
               for _ in range(steps + 1)]
    bare._ddpm_step(*batches[0], g)
    start = time.perf_counter()
    for x, ids in batches[1:]:
        bare._ddpm_step(x, ids, g)
    plain = steps * BATCH_IMAGES / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), shipped_models=False)
        sessions = make_sessionmaker(make_engine(settings.db_url))
        blobs = open_blobs(settings)
        data = path.read_bytes()
        with sessions() as db:
            db.add(File(id="file-img", filename=path.name, purpose="fine-tune", format="npz", records=len(train),
                        bytes=len(data), sha256=blobs.put_bytes(data)))
            db.commit()
            job = store.create_job(db, base_model="ddpm", family="ddpm", suffix="bench", training_file="file-img",
                                   hyperparameters={"max_steps": steps, "batch_size": BATCH_IMAGES,
                                                    "eval_every": steps}, seed=0)
        run_job(job.id, settings=settings, sessions=sessions, blobs=blobs, shutting_down=threading.Event())
        with sessions() as db:
            rates = sorted(e.data["images_per_s"] for e in db.query(JobEvent).filter_by(job_id=job.id)
                           if "images_per_s" in e.data)
    return plain, rates[len(rates) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bf16-steps", type=int, default=2, help="0 skips bf16 (about a minute a step on a CPU without AVX512-BF16)")
    ap.add_argument("--image-steps", type=int, default=20, help="0 skips the image row")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        path = corpus_file(Path(tmp))
        print(f"{torch.get_num_threads()} threads; matmul peak fp32 {peaks['fp32']:.1f} GFLOP/s, "
              f"bf16 {peaks['bf16']:.1f} GFLOP/s; batch {BATCH} × {SHAPE['context']} tokens")
        print(f"{'precision':>9} | {'plain tok/s':>11} | {'job tok/s':>9} | {'job/plain':>9} | "
              f"{'plain % peak':>12} | {'job % peak':>10}")
        print("-" * 76)
        for precision, steps in (("fp32", args.steps), ("bf16", args.bf16_steps)):
            if steps == 0:
                continue
            bf16 = precision == "bf16"
            plain, n_params = plain_loop(path, steps, bf16)
            job = job_runner(path, steps, bf16)
            flops = 6 * n_params  # per token, forward + backward
            print(f"{precision:>9} | {plain:>11.0f} | {job:>9.0f} | {job / plain:>9.2f} | "
                  f"{100 * plain * flops / 1e9 / peaks[precision]:>11.1f}% | "
                  f"{100 * job * flops / 1e9 / peaks[precision]:>9.1f}%")
        if args.image_steps:
            plain, job = image_rates(Path(tmp), args.image_steps)
            print(f"\nimages (ddpm, 32×32, batch {BATCH_IMAGES}): bare steps {plain:.1f} img/s, "
                  f"job runner {job:.1f} img/s, ratio {job / plain:.2f}")


if __name__ == "__main__":
    main()
