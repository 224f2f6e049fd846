"""Train the shipped image models: emoji-diffusion (ddpm), emoji-gan (dcgan) and their ×2 upscaler.

    .venv/bin/python benchmarks/train_images.py [--data ../shared/data/images/emoji64] \\
        [--ddpm-minutes 24] [--gan-minutes 12] [--upscaler-minutes 15] [--threads 2] [--ship]

Each model trains in runs/<name>/ (rerun the same command to resume after an
interruption), keeps its best EMA weights in runs/<name>/best/, and with --ship is copied
to atelier/assets/models/<name>/ with a contact sheet in docs/<name>.png (8 prompts × 8
seeds). The GAN reads prompts with the diffusion model's text encoder (copied, frozen),
so the diffusion model trains first. The upscaler (32→64, runs/emoji-upscaler/) is shipped
inside both models' folders (upscaler.json + upscaler.safetensors), which makes them serve
64×64. Every run logs one line per event to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.images.png import encode_png  # noqa: E402
from atelier.models import dcgan, ddpm  # noqa: E402
from atelier.families.shipped import SHIPPED_DIR  # noqa: E402
from atelier.training.image_trainer import ImageTrainConfig, train_images  # noqa: E402
from atelier.training.upscaler_trainer import UpscalerTrainConfig, train_upscaler  # noqa: E402

DDPM_CONFIG = dict(base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=1, attention_resolutions=[8],
                   text_dim=128, cond_drop_prob=0.1)
GAN_CONFIG = dict(z_dim=64, g_channels=64, d_channels=48, text_dim=128)
UPSCALER_CONFIG = dict(channels=32, num_blocks=5)
SHEET_PROMPTS = ["smiling face", "cat face", "red apple", "heart", "car", "flag", "tree", "fish"]


def log(e: dict) -> None:
    keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}
    print(time.strftime("%H:%M:%S"), json.dumps(keep), flush=True)


def contact_sheet(images: np.ndarray, cols: int, scale: int = 2) -> np.ndarray:
    """(N, S, S, 3) → one (rows·(S+2)·scale, cols·(S+2)·scale, 3) grid on white."""
    n, s = len(images), images.shape[1]
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * (s + 2), cols * (s + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * (s + 2) + 1: r * (s + 2) + 1 + s, c * (s + 2) + 1: c * (s + 2) + 1 + s] = im
    return sheet.repeat(scale, 0).repeat(scale, 1)


def sheet_for(family: str, folder: Path, out: Path, seeds=range(8)) -> None:
    if family == "ddpm":
        model, vocab = ddpm.from_pretrained(folder)
        gen = lambda ps, ss: ddpm.generate(model, vocab, ps, ss, steps=30, guidance=3.0)  # noqa: E731
    else:
        model, vocab = dcgan.from_pretrained(folder)
        gen = lambda ps, ss: dcgan.generate(model, vocab, ps, ss)  # noqa: E731
    rows = [gen([p] * len(seeds), list(seeds)).numpy() for p in SHEET_PROMPTS]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(contact_sheet(np.concatenate(rows), cols=len(seeds)),
                               parameters=f"rows: {', '.join(SHEET_PROMPTS)}; columns: seeds {list(seeds)}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "images" / "emoji64"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--ddpm-minutes", type=float, default=24)
    ap.add_argument("--gan-minutes", type=float, default=12)
    ap.add_argument("--upscaler-minutes", type=float, default=15)
    ap.add_argument("--ddpm-steps", type=int, default=20000)
    ap.add_argument("--ddpm-lr", type=float, default=8e-4, help="lower it for a last resumed segment (a step decay)")
    ap.add_argument("--gan-steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250, help="ddpm evaluation and checkpoint interval (steps)")
    ap.add_argument("--upscaler-steps", type=int, default=6000)
    ap.add_argument("--only", choices=["ddpm", "dcgan", "upscaler"], default=None)
    ap.add_argument("--ship", action="store_true", help="copy the results to atelier/assets/models and docs/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    ddpm_best = runs / "emoji-diffusion" / "best"
    if args.only in (None, "ddpm"):
        ddpm_best = train_images(ImageTrainConfig(family="ddpm", max_steps=args.ddpm_steps, batch_size=args.batch_size,
                                                  lr=args.ddpm_lr, warmup_steps=200, ema_decay=0.995,
                                                  eval_every=args.eval_every, max_minutes=args.ddpm_minutes),
                                 runs / "emoji-diffusion", data=args.data, model_cfg=DDPM_CONFIG, on_event=log)
        if args.ship:
            ship(ddpm_best, "emoji-diffusion", "ddpm")
    if args.only in (None, "upscaler"):
        best = train_upscaler(UpscalerTrainConfig(max_steps=args.upscaler_steps, batch_size=args.batch_size,
                                                  max_minutes=args.upscaler_minutes, eval_every=250),
                              runs / "emoji-upscaler", data=args.data, model_cfg=UPSCALER_CONFIG, on_event=log)
        if args.ship:
            ship_upscaler(best)
    if args.only in (None, "dcgan"):
        gan_best = train_images(ImageTrainConfig(family="dcgan", max_steps=args.gan_steps, batch_size=args.batch_size,
                                                 lr=2e-4, warmup_steps=0, ema_decay=0.999, eval_every=500,
                                                 max_minutes=args.gan_minutes),
                                runs / "emoji-gan", data=args.data, model_cfg=GAN_CONFIG, text_from=ddpm_best,
                                on_event=log)
        if args.ship:
            ship(gan_best, "emoji-gan", "dcgan")


def ship_upscaler(best: Path) -> None:
    """The same upscaler goes into both image models (the blob store keeps one copy)."""
    for name, family in (("emoji-diffusion", "ddpm"), ("emoji-gan", "dcgan")):
        dest = SHIPPED_DIR / name
        for f in ("upscaler.json", "upscaler.safetensors", "upscaler-training.json"):
            shutil.copyfile(best / f, dest / f)
        sheet_for(family, dest, ROOT / "docs" / f"{name}.png")
        print(f"shipped the upscaler into {dest}", flush=True)


def ship(best: Path, name: str, family: str) -> None:
    dest = SHIPPED_DIR / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "vocab.json", "training.json"):
        shutil.copyfile(best / f, dest / f)
    sheet_for(family, dest, ROOT / "docs" / f"{name}.png")
    print(f"shipped {name} to {dest}; contact sheet docs/{name}.png", flush=True)


if __name__ == "__main__":
    main()
