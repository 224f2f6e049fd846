"""Train the shipped tune model, folk-tunes, on the Nottingham Music Database.

    .venv/bin/python benchmarks/train_music.py [--data ../shared/data/music] [--minutes 45] \\
        [--threads 1] [--ship]

It trains in runs/folk-tunes/ (rerun the same command to resume after an interruption),
keeps the best weights by validation loss in runs/folk-tunes/best/, and with --ship copies
them to atelier/assets/models/folk-tunes/ with a model card written from training.json and
sample tunes drawn with fixed seeds (`--card-only` rewrites the card). One line per event on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.families.shipped import SHIPPED_DIR  # noqa: E402
from atelier.training.music import train_tunes  # noqa: E402
from atelier.training.trainer import TrainConfig  # noqa: E402

MODEL = dict(n_positions=384, n_embd=192, n_layer=4, n_head=6, dropout=0.1)
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")


def log(e: dict) -> None:
    keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}
    print(time.strftime("%H:%M:%S"), json.dumps(keep), flush=True)


def write_card(folder: Path, minutes: float) -> None:
    """README.md for a shipped folder: data, licence, training, metrics, samples, limits."""
    from atelier.families.abc_gpt import family
    from atelier.music.compose import TuneRequest

    record = json.loads((folder / "training.json").read_text())
    cfg, data, metrics = record["model_config"], record["data"], record["metrics"]
    params = sum(p.numel() for p in family.load(folder).model.parameters())
    model = family.load(folder)
    samples = [model.compose(TuneRequest(meter=m, key=k, seed=s, title=t))
               for m, k, s, t in (("6/8", "D", 1, "Sample jig"), ("4/4", "G", 2, "Sample reel"))]
    history = "\n".join(f"| {h['step']} | {h['val_loss']:.4f} |" for h in record["history"][::3] + record["history"][-1:])
    files = "\n".join(f"| `{Path(f['file']).name}` | `{f['sha256'][:16]}…` |" for f in data["files"])
    card = f"""# folk-tunes

Writes folk melodies in ABC notation — jigs, reels, hornpipes, waltzes, polkas — with chord
symbols, pickups, repeats and endings. An `abc-gpt` model: chargpt's GPT-2-style decoder over
ABC tokens (one token per pitch, length, bar line, chord symbol, triplet, tie or roll; the
vocabulary is `tokenizer.json`). Trained here, on one CPU core, from nothing but the data
below. Served through Atelier (`POST /api/music`), its decoder is constrained so that every
tune parses and every bar scans; plain sampling is not.

## Model
| | |
| --- | --- |
| parameters | {params / 1e6:.2f} M |
| layers × width × heads | {cfg['n_layer']} × {cfg['n_embd']} × {cfg['n_head']} |
| context | {cfg['n_positions']} tokens |
| vocabulary | {data['vocab_size']} tokens |

## Data and licence
The Nottingham Music Database, Jukedeck's cleaned ABC
(https://github.com/jukedeck/nottingham-dataset, commit 0992bb6, `ABC_cleaned/`), via
`../shared/data/music/`. **GPL-3.0** — and so these weights are distributed under the
GPL-3.0 too (`../shared/data/music/LICENSE-nottingham-GPL-3.0.txt`). Atelier's code is MIT.

{data['tunes']} tunes were read (tunes that do not parse, whose bars do not scan, or that change
key or meter mid-tune were skipped: {data['skipped']}); {data['val_tunes']} held out for validation by a
hash of the tune (5 %), {data['train_tunes']} for training, each transposed to the twelve keys where
it stays in a fiddle's range: {data['train_sequences']} training sequences.

| file | sha256 |
| --- | --- |
{files}

## Training
```bash
.venv/bin/python benchmarks/train_music.py --minutes {minutes:g} --steps {metrics['steps']} --ship
```
AdamW, peak learning rate {record['train_config']['lr']}, {record['train_config']['warmup_steps']} warm-up steps
then cosine decay, batch {record['train_config']['batch_size']} windows of {cfg['n_positions']} tokens, dropout
{cfg['dropout']}, fp32, {metrics['steps']} steps ({metrics['tokens_seen']:,} tokens), resumable from its checkpoints.

## Metrics
Best validation loss **{metrics['val_loss']:.4f}** nats per token at step {metrics['best_step']}.

| step | validation loss |
| --- | --- |
{history}

`benchmarks/music_eval.py` compares 200 tunes with the held-out ones (see Atelier's README).

## Samples (through the constrained decoder, temperature 1, top-p 0.95)
```abc
{samples[0].abc}
{samples[1].abc}```

## Limits
A small model trained for under an hour: it has the rhythms, keys and chord vocabulary of
the Nottingham tunes, but phrases wander more than a folk musician's and parts rarely
answer each other. The corpus is British and American dance music in major and minor
keys: modes are written under the key with the same signature.
"""
    (folder / "README.md").write_text(card, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "music"))
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "folk-tunes"))
    ap.add_argument("--minutes", type=float, default=45)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--card-only", action="store_true", help="rewrite the shipped model card and stop")
    args = ap.parse_args()
    if args.card_only:
        write_card(SHIPPED_DIR / "folk-tunes", args.minutes)
        return
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=100,
                      eval_every=100, eval_batches=8, patience=6, log_every=10, max_minutes=args.minutes, seed=1)
    best = train_tunes(args.data, args.workdir, MODEL, cfg, on_event=log)
    if args.ship:
        target = SHIPPED_DIR / "folk-tunes"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED_FILES:
            shutil.copy2(best / name, target / name)
        write_card(target, args.minutes)
        print(f"shipped {best} → {target}")


if __name__ == "__main__":
    main()
