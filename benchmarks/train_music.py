"""Train the shipped tune model, folk-tunes, on the Nottingham Music Database.

    .venv/bin/python benchmarks/train_music.py [--data ../shared/data/music] [--minutes 45] \\
        [--threads 1] [--ship]

It trains in runs/folk-tunes/ (rerun the same command to resume after an interruption),
keeps the best weights by validation loss in runs/folk-tunes/best/, and with --ship copies
them to atelier/assets/models/folk-tunes/ beside the model card. One line per event on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=100,
                      eval_every=100, eval_batches=8, patience=6, log_every=10, max_minutes=args.minutes, seed=1)
    best = train_tunes(args.data, args.workdir, MODEL, cfg, on_event=log)
    if args.ship:
        target = SHIPPED_DIR / "folk-tunes"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED_FILES:
            shutil.copy2(best / name, target / name)
        print(f"shipped {best} → {target}")


if __name__ == "__main__":
    main()
