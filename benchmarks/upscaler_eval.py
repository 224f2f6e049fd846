"""The ×2 upscaler against interpolation, on held-out emoji pairs (32×32 → 64×64).

    .venv/bin/python benchmarks/upscaler_eval.py [--model emoji-diffusion] [--threads 1]

Pairs: the 135 base designs held out from every image model (emoji32.npz → emoji64.npz,
the same split as training). Baselines, measured in the same run on the same pairs:
nearest-neighbour (what `upscaler=nearest` serves), bilinear (the network's starting
point) and Pillow's bicubic. Metrics: PSNR in dB over 8-bit images (higher is better) and
the mean absolute error of the Sobel edge magnitude (lower is better: how well outlines,
the thing interpolation smears, come back). Ratios are MSE of the baseline / MSE of the
upscaler; ms per image is the time to enlarge one image (as the server does, one at a time).
Writes docs/emoji-upscaler.png: rows of real 64×64, nearest, bicubic, learned,
for held-out designs, and for the shipped model's own samples (no ground truth there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.images.png import encode_png, upscale as nearest  # noqa: E402
from atelier.models import ddpm, upscaler  # noqa: E402
from atelier.families.shipped import SHIPPED_DIR  # noqa: E402
from atelier.training.image_data import load_emoji  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "images" / "emoji64"


def bicubic(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * 2, h * 2), Image.BICUBIC))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-10))


def edges(images: np.ndarray) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, (N, H, W)."""
    x = torch.from_numpy(images).float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 255
    kx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float32).view(1, 1, 3, 3)
    gx, gy = F.conv2d(x, kx, padding=1), F.conv2d(x, kx.transpose(2, 3), padding=1)
    return (gx ** 2 + gy ** 2).sqrt()[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji-diffusion", help="a shipped image model that carries the upscaler")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = SHIPPED_DIR / args.model
    net = upscaler.from_pretrained(folder)
    _, low_val, _ = load_emoji(DATA, size=32)
    _, high_val, _ = load_emoji(DATA, size=64)
    low, high = low_val.images, high_val.images
    methods = {"nearest": lambda im: nearest(im, 2), "bilinear": lambda im: upscaler.bilinear(im),
               "bicubic (Pillow)": bicubic, "learned": lambda im: upscaler.upscale(net, im)}
    outs, ms = {}, {}
    for name, f in methods.items():
        t = time.perf_counter()
        outs[name] = np.stack([f(im) for im in low])
        ms[name] = (time.perf_counter() - t) * 1000 / len(low)
    real_edges = edges(high)
    mse = {k: np.mean((v.astype(np.float64) - high) ** 2) for k, v in outs.items()}
    print(f"{len(low)} held-out pairs, upscaler {net.n_params:,} parameters ({folder.name})\n")
    print("| method | PSNR dB | edge MAE | MSE ratio (method / learned) | ms per image |\n| --- | --- | --- | --- | --- |")
    for k, v in outs.items():
        e = float((edges(v) - real_edges).abs().mean())
        print(f"| {k} | {np.mean([psnr(a, b) for a, b in zip(v, high)]):.2f} | {e:.4f} | "
              f"{mse[k] / mse['learned']:.2f} | {ms[k]:.2f} |")
    # The sheet: held-out designs (real / nearest / bicubic / learned) and the model's own samples.
    pick = np.linspace(0, len(low) - 1, 8).astype(int)
    rows = [high[pick], outs["nearest"][pick], outs["bicubic (Pillow)"][pick], outs["learned"][pick]]
    model, vocab = ddpm.from_pretrained(folder)
    samples = ddpm.generate(model, vocab, ["smiling face", "cat face", "red apple", "heart", "car", "flag", "tree",
                                           "fish"], list(range(8)), steps=30, guidance=3.0).numpy()
    rows += [np.stack([nearest(im, 2) for im in samples]), np.stack([upscaler.upscale(net, im) for im in samples])]
    sheet = np.full((len(rows) * 66, 8 * 66, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet[r * 66 + 1: r * 66 + 65, c * 66 + 1: c * 66 + 65] = im
    out = ROOT / "docs" / "emoji-upscaler.png"
    out.write_bytes(encode_png(sheet.repeat(2, 0).repeat(2, 1), parameters=(
        "rows: held-out real 64x64, nearest, bicubic, learned; then emoji-diffusion samples nearest, learned")))
    print(f"\ncomparison sheet: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
