"""Image model quality: Fréchet distance, memorisation and prompt adherence, ddpm vs dcgan vs real.

    .venv/bin/python benchmarks/image_eval.py [--steps 20] [--guidance 3] [--seeds 1] [--threads 2]

Feature space. No downloaded Inception network: a small convolutional autoencoder is
trained here on the training split of the emoji set (32×32, 1,553 base designs; code of
256 numbers, MSE reconstruction, 1,500 steps of batch 64, seed 0; cached in
runs/image-eval-autoencoder/). Its 256-d code is the feature in which distances are
measured; it has only ever seen training images.

Sets compared, all conditioned on the *held-out* designs' names (135 designs the image
models never saw), one image per name and seed:
  real-val  — the held-out images themselves: the floor a model can hope for
  ddpm      — emoji-diffusion, DDIM `--steps`, guidance `--guidance`
  ddpm-uncond — emoji-diffusion with an empty prompt (no text at all)
  dcgan     — emoji-gan
Metrics (each against the training split):
  FD        — Fréchet distance between Gaussian fits of the features of the set and of the
              training images (lower is better; N is small, so compare sets with the same N)
  NN-pixel  — mean distance (RMS over pixels in [0, 1]) from each image to its nearest
              training image; real-val gives the distance of genuinely new designs, so a model
              far *below* it copies training images; copies% = share closer than 0.05
  top-1/top-5 — prompt adherence: is the image's nearest held-out real image (in feature space)
              the one whose name was the prompt? (chance: 1/135 and 5/135)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.models import dcgan, ddpm  # noqa: E402
from atelier.families.shipped import SHIPPED_DIR  # noqa: E402
from atelier.training.image_data import load_emoji, to_tensor  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "images" / "emoji64"
AE_DIR = ROOT / "runs" / "image-eval-autoencoder"


class AutoEncoder(nn.Module):
    """32×32×3 → 256 → 32×32×3."""

    def __init__(self, code: int = 256):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.LeakyReLU(0.1), nn.Conv2d(32, 64, 4, 2, 1),
                                 nn.LeakyReLU(0.1), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.1), nn.Flatten(),
                                 nn.Linear(128 * 16, code))
        self.dec = nn.Sequential(nn.Linear(code, 128 * 16), nn.Unflatten(1, (128, 4, 4)), nn.LeakyReLU(0.1),
                                 nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.LeakyReLU(0.1),
                                 nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.LeakyReLU(0.1),
                                 nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        return self.dec(self.enc(x))


def autoencoder(train_images: np.ndarray, steps: int = 1500) -> AutoEncoder:
    from safetensors.torch import load_file, save_file

    ae = AutoEncoder()
    path = AE_DIR / "model.safetensors"
    if path.exists():
        ae.load_state_dict(load_file(path))
        return ae.eval()
    torch.manual_seed(0)
    x = to_tensor(train_images)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.mse_loss(ae(x[idx]), x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"  autoencoder step {step}: mse {float(loss):.4f}", flush=True)
    AE_DIR.mkdir(parents=True, exist_ok=True)
    save_file(ae.state_dict(), str(path))
    return ae.eval()


@torch.no_grad()
def features(ae: AutoEncoder, images: np.ndarray) -> np.ndarray:
    return torch.cat([ae.enc(to_tensor(images[i:i + 256])) for i in range(0, len(images), 256)]).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), the square root through eigenvalues of Σa^½ Σb Σa^½."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    wa, va = np.linalg.eigh(ca)
    sqrt_a = (va * np.sqrt(np.clip(wa, 0, None))) @ va.T
    w = np.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(w, 0, None)).sum())


def nn_pixel(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """RMS pixel distance (in [0, 1]) from each image to its nearest training image."""
    t = torch.from_numpy(train.reshape(len(train), -1).astype(np.float32) / 255)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)
    d = torch.cdist(x, t).min(dim=1).values / (t.shape[1] ** 0.5)
    return d.numpy()


def adherence(feats: np.ndarray, real_feats: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    d = torch.cdist(torch.from_numpy(feats), torch.from_numpy(real_feats))
    rank = (d < d[torch.arange(len(feats)), torch.from_numpy(targets)][:, None]).sum(1)
    return float((rank < 1).double().mean()), float((rank < 5).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=1, help="images per held-out name (1 keeps N equal to real-val)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, val, _ = load_emoji(DATA)
    t0 = time.time()
    ae = autoencoder(train.images)
    train_f, val_f = features(ae, train.images), features(ae, val.images)
    print(f"autoencoder ready ({time.time() - t0:.0f} s); train {len(train)} images, held-out {len(val)} designs")
    names = [n for n in val.names for _ in range(args.seeds)]
    targets = np.array([i for i in range(len(val)) for _ in range(args.seeds)])
    seeds = [s for _ in val.names for s in range(args.seeds)]
    sets = {"real-val": (val.images, np.arange(len(val)))}
    dm, dv = ddpm.from_pretrained(SHIPPED_DIR / "emoji-diffusion")
    for label, prompts in (("ddpm", names), ("ddpm-uncond", [""] * len(names))):
        t0 = time.time()
        imgs = np.concatenate([ddpm.generate(dm, dv, prompts[i:i + 32], seeds[i:i + 32], steps=args.steps,
                                             guidance=args.guidance).numpy() for i in range(0, len(prompts), 32)])
        print(f"{label}: {len(imgs)} images in {time.time() - t0:.0f} s")
        sets[label] = (imgs, targets)
    gm, gv = dcgan.from_pretrained(SHIPPED_DIR / "emoji-gan")
    sets["dcgan"] = (dcgan.generate(gm, gv, names, seeds).numpy(), targets)
    print(f"\n{'set':12s} {'N':>4s} {'FD':>8s} {'NN-pixel':>9s} {'copies%':>8s} {'top-1':>6s} {'top-5':>6s}")
    for label, (imgs, tg) in sets.items():
        f = features(ae, imgs)
        nn_d = nn_pixel(imgs, train.images)
        top1, top5 = adherence(f, val_f, tg)
        print(f"{label:12s} {len(imgs):4d} {frechet(f, train_f):8.2f} {nn_d.mean():9.4f} {100 * (nn_d < 0.05).mean():7.1f}% "
              f"{100 * top1:5.1f}% {100 * top5:5.1f}%")
    print(f"(chance adherence: top-1 {100 / len(val):.1f}%, top-5 {500 / len(val):.1f}%; FD of real-val is the floor "
          f"at N={len(val)}, models use N={len(names)})")


if __name__ == "__main__":
    main()
