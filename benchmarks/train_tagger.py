"""Train the picture tagger of image → poem (`emoji-tagger`) and print how well it sees held-out designs.

    .venv/bin/python benchmarks/train_tagger.py [--steps 3000] [--image-size 32] [--threads 2] [--ship]

First a run that holds out 15 % of the emoji designs (all their skin tones) and reports, on
the held-out base pictures: precision and recall of labels at probability 0.5, recall averaged
over labels, and how often the likeliest label is right. With --ship a second run trains on
every design and is copied to atelier/assets/models/emoji-tagger/ with the held-out figures in
its training.json. Each run takes about two minutes at 32×32 on two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import torch
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.families.shipped import SHIPPED_DIR  # noqa: E402
from atelier.training.tagger import TaggerTrainConfig, train_tagger  # noqa: E402

FIGURES = ("precision", "recall", "label_recall", "top1", "val_pictures", "val_labelled")


def run(data: Path, out: Path, cfg: TaggerTrainConfig, title: str) -> dict:
    with Progress() as progress:
        task = progress.add_task(title, total=cfg.steps)
        last = {}

        def on_event(e):
            last.update(e)
            progress.update(task, completed=e["step"],
                            description=f"{title} top-1 {e.get('top1', 0):.2f}" if "top1" in e else title)

        train_tagger(data, out, cfg, on_event=on_event)
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "images" / "emoji64"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", action="store_true", help="then train on every design and ship it as emoji-tagger")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(steps=args.steps, image_size=args.image_size, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        held = run(Path(args.data), Path(tmp) / "held-out", TaggerTrainConfig(**cfg), "held-out run")
    print("| held-out base designs | labelled | precision @0.5 | recall @0.5 | recall per label | top-1 right |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {held['val_pictures']} | {held['val_labelled']} | {held['precision']:.1%} | {held['recall']:.1%} | "
          f"{held['label_recall']:.1%} | {held['top1']:.1%} |")
    if not args.ship:
        return
    out = SHIPPED_DIR / "emoji-tagger"
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(args.data), Path(tmp), TaggerTrainConfig(**cfg, val_fraction=0.0), "shipped run (every design)")
        training = json.loads((Path(tmp) / "training.json").read_text(encoding="utf-8"))
        training["held_out"] = {k: held[k] for k in FIGURES} | {"command": " ".join(["benchmarks/train_tagger.py",
                                                                                     *sys.argv[1:]])}
        (Path(tmp) / "training.json").write_text(json.dumps(training, indent=2), encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json", "training.json"):
            shutil.copy(Path(tmp) / name, out / name)
    print(f"shipped {out}")


if __name__ == "__main__":
    main()
