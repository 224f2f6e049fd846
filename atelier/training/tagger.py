"""Training a picture tagger on named pictures (the emoji in ../shared/data/images/emoji64).

Each picture's labels are the concepts its name calls up (atelier/images/keywords.py); a
picture whose name calls up none is a negative for every label. The held-out pictures are
whole *designs*: a design's skin-tone variants stay on the side of the split their base is
on, so the held-out figures are on designs the tagger never saw.

Augmentation teaches what an upload varies in and emoji do not: position and scale (random
crops of a white-padded picture), mirror images, and the background (a random flat colour
replaces the white in a third of the pictures), and how a drawing differs from an emoji: flat
colours (posterised), soft edges (blurred) and contrast.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from atelier.images.keywords import CONCEPTS, concepts_of
from atelier.models.tagger import Tagger, TaggerConfig, save_pretrained

MODIFIERS = ("EMOJI MODIFIER FITZPATRICK",)  # a skin tone: the same design


@dataclass
class TaggerTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    val_fraction: float = 0.15  # of designs; 0 trains on everything (a shipped model)
    seed: int = 0
    eval_every: int = 250
    image_size: int = 32
    threshold: float = 0.5  # a label counts as seen at this probability (for precision and recall)


@dataclass
class NamedPictures:
    images: np.ndarray  # (N, S, S, 3) uint8 on white
    labels: np.ndarray  # (N, L) float32 0/1
    designs: list[str]  # the base design of each picture (name without skin-tone modifiers)


def load_emoji(data_dir: Path, image_size: int) -> NamedPictures:
    data_dir = Path(data_dir)
    npz = np.load(data_dir / f"emoji{image_size}.npz", allow_pickle=False)
    rows = list(csv.DictReader(open(data_dir / "manifest.csv", encoding="utf-8")))
    labels = np.zeros((len(rows), len(CONCEPTS)), np.float32)
    designs = []
    for i, r in enumerate(rows):
        labels[i, sorted(concepts_of(r["name"]))] = 1.0
        parts = [p for p in r["name"].split(" + ") if not p.startswith(MODIFIERS)]
        designs.append(" + ".join(parts) or r["file"])
    return NamedPictures(npz["images"], labels, designs)


def split_designs(designs: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a held-out design is out of training with all its variants, and
    only its base picture is evaluated (hundreds of skin tones of one hand would weigh as hundreds)."""
    names = sorted(set(designs))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(names, size=int(round(fraction * len(names))), replace=False).tolist()) if fraction else set()
    side = np.array([d in held for d in designs])
    first = {}
    for i, d in enumerate(designs):
        first.setdefault(d, i)
    return np.flatnonzero(~side), np.array(sorted(first[d] for d in held), dtype=np.int64)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, S, S) in [−1, 1], white background → shifted, scaled, mirrored, some on a flat colour."""
    B, _, S, _ = x.shape
    white = (x > 0.88).all(1, keepdim=True)
    recolour = torch.rand(B, 1, 1, 1, generator=gen) < 1 / 3
    colour = torch.rand(B, 3, 1, 1, generator=gen) * 2 - 1
    x = torch.where(white & recolour, colour.expand_as(x), x)
    # A random affine crop: scale 0.75–1.15, shift up to an eighth, mirrored half the time; outside is background.
    scale = 0.75 + 0.4 * torch.rand(B, generator=gen)
    flip = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
    shift = (torch.rand(B, 2, generator=gen) - 0.5) / 4
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = torch.where(recolour, colour, torch.ones(B, 3, 1, 1))
    x = F.grid_sample(x - fill, grid, align_corners=False, padding_mode="zeros") + fill
    # Drawings are flatter and softer than emoji: posterise a third, blur a third, and vary contrast.
    flat = torch.rand(B, 1, 1, 1, generator=gen) < 1 / 3
    levels = torch.randint(3, 6, (B, 1, 1, 1), generator=gen).float()
    x = torch.where(flat, torch.round((x + 1) / 2 * levels) / levels * 2 - 1, x)
    soft = torch.rand(B, 1, 1, 1, generator=gen) < 1 / 3
    x = torch.where(soft, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    contrast = 0.8 + 0.4 * torch.rand(B, 1, 1, 1, generator=gen)
    return (x * contrast).clamp(-1, 1)


@torch.no_grad()
def evaluate(model: Tagger, x: torch.Tensor, y: torch.Tensor, threshold: float) -> dict:
    """Held-out figures: loss, precision and recall of labels at `threshold`, and how often the
    top label is right on pictures that have a label."""
    model.eval()
    logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    model.train()
    p = torch.sigmoid(logits)
    hit = (p >= threshold)
    tp = (hit & (y > 0)).sum().item()
    labelled = y.sum(1) > 0
    top = p.argmax(1)
    top_right = y[torch.arange(len(y)), top][labelled]
    present = y.sum(0) > 0
    per_label = ((hit & (y > 0)).sum(0)[present] / y.sum(0)[present]).mean().item() if present.any() else 0.0
    return {"val_loss": F.binary_cross_entropy_with_logits(logits, y).item(),
            "precision": tp / max(1, hit.sum().item()), "recall": tp / max(1, (y > 0).sum().item()),
            "label_recall": per_label,  # recall averaged over labels: rare ones count as much as 人
            "top1": top_right.mean().item() if len(top_right) else 0.0, "val_pictures": len(y),
            "val_labelled": int(labelled.sum())}


def train_tagger(data_dir: Path, out: Path, cfg: TaggerTrainConfig,
                 on_event: Callable[[dict], None] = lambda e: None) -> dict:
    """Train, then save the weights, config and training.json in `out`; the final figures."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_emoji(data_dir, cfg.image_size)
    train_idx, val_idx = split_designs(data.designs, cfg.val_fraction, cfg.seed)
    to_x = lambda idx: torch.from_numpy(data.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # noqa: E731
    x, y = to_x(train_idx), torch.from_numpy(data.labels[train_idx])
    xv, yv = to_x(val_idx), torch.from_numpy(data.labels[val_idx])
    model = Tagger(TaggerConfig(image_size=cfg.image_size,
                                labels=[{"keyword": c.keyword, "gloss": c.gloss} for c in CONCEPTS]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    started, figures = time.time(), {}
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(augment(x[idx], gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            figures = {"step": step, "loss": loss.item(), "elapsed_s": round(time.time() - started, 1)}
            if len(val_idx):
                figures |= evaluate(model, xv, yv, cfg.threshold)
            on_event(figures)
    save_pretrained(model.eval(), out)
    training = {"family": "image-tagger", "train_config": asdict(cfg), "metrics": figures,
                "data": {"source": str(data_dir), "file": f"emoji{cfg.image_size}.npz", "train_pictures": len(x),
                         "held_out_pictures": len(xv), "labelled_train_pictures": int((y.sum(1) > 0).sum())}}
    (Path(out) / "training.json").write_text(json.dumps(training, indent=2), encoding="utf-8")
    return figures


__all__ = ["TaggerTrainConfig", "evaluate", "load_emoji", "split_designs", "train_tagger"]
