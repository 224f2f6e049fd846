"""The emoji image set (shared/data/images/emoji64): base designs, a split by design, batches.

`emoji32.npz` / `emoji64.npz` hold 3,583 Noto emoji on white; 1,895 of them are skin-tone
variants (near-duplicates of a base design), so only the 1,688 base designs
(`skin_tone_variant == 0` in manifest.csv) are used, and the validation split holds out
whole designs. The text of an image is its Unicode name ("GRINNING CAT FACE WITH SMILING
EYES"; empty for 28 recent emoji, which then train the unconditional model only).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atelier.models.text_encoder import WordVocab


@dataclass
class EmojiSet:
    images: np.ndarray  # (N, S, S, 3) uint8
    names: list[str]
    indices: list[int]  # rows of the source npz

    def __len__(self) -> int:
        return len(self.names)


def load_emoji(folder: str | Path, *, size: int = 32, val_fraction: float = 0.08,
               seed: int = 0) -> tuple[EmojiSet, EmojiSet, dict]:
    """(train, val, provenance) from the base designs, split by design with a seeded permutation."""
    folder = Path(folder)
    npz_path = folder / f"emoji{size}.npz"
    if not npz_path.exists():
        raise FileNotFoundError(f"{npz_path} not found (sizes available: 32, 64)")
    with np.load(npz_path, allow_pickle=False) as d:
        images = d["images"]
    with open(folder / "manifest.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(images):
        raise ValueError(f"manifest.csv has {len(rows)} rows but {npz_path.name} has {len(images)} images")
    base = [int(r["index"]) for r in rows if r["skin_tone_variant"] == "0"]
    perm = np.random.default_rng(seed).permutation(len(base))
    n_val = max(1, int(round(len(base) * val_fraction)))
    val_idx, train_idx = sorted(base[i] for i in perm[:n_val]), sorted(base[i] for i in perm[n_val:])

    def subset(idx):
        return EmojiSet(images[idx], [rows[i]["name"] for i in idx], idx)

    provenance = {"source": str(folder), "file": npz_path.name,
                  "sha256": hashlib.sha256(npz_path.read_bytes()).hexdigest(),
                  "images_total": len(images), "base_designs": len(base), "skin_tone_variants_dropped": len(images) - len(base),
                  "train": len(train_idx), "val": len(val_idx), "split": f"by design, seed {seed}, {val_fraction:.0%} held out",
                  "licence": "SIL OFL 1.1 (Noto Emoji), see LICENSE-noto-emoji-OFL-1.1.txt"}
    return subset(train_idx), subset(val_idx), provenance


def load_npz(path: str | Path, *, size: int = 32, val_fraction: float = 0.08,
             seed: int = 0) -> tuple[EmojiSet, EmojiSet, dict]:
    """(train, val, provenance) from a user's .npz: `images` uint8 (N, size, size, 3), optional `names` (N,) captions.

    Without `names` every caption is empty (the model learns unconditionally).
    """
    from atelier.training.uploads import npz_arrays

    path = Path(path)
    # The headers first (no object dtypes, sizes that add up), so a bad file is refused before it inflates.
    declared = npz_arrays(path)
    if "images" not in declared:
        raise ValueError(f"{path.name} has no 'images' array")
    shape, dtype = declared["images"]
    if dtype != np.uint8 or shape[1:] != (size, size, 3):
        raise ValueError(f"images must be uint8 N×{size}×{size}×3, got {dtype} {shape}")
    with np.load(path, allow_pickle=False) as d:
        images = d["images"]
        names = [str(n) for n in d["names"]] if "names" in d.files else [""] * len(images)
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images must be uint8 N×{size}×{size}×3, got {images.dtype} {tuple(images.shape)}")
    if len(names) != len(images):
        raise ValueError(f"names has {len(names)} entries for {len(images)} images")
    if len(images) < 2:
        raise ValueError("at least 2 images are needed (one is held out)")
    perm = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, int(round(len(images) * val_fraction)))
    val_idx, train_idx = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())

    def subset(idx):
        return EmojiSet(images[idx], [names[i] for i in idx], idx)

    provenance = {"source": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "images_total": len(images), "train": len(train_idx), "val": len(val_idx),
                  "split": f"seed {seed}, {val_fraction:.0%} held out"}
    return subset(train_idx), subset(val_idx), provenance


def load_images(source: str | Path, **kw) -> tuple[EmojiSet, EmojiSet, dict]:
    """The emoji folder (emoji32.npz + manifest.csv) or a user's .npz file."""
    return load_npz(source, **kw) if Path(source).is_file() else load_emoji(source, **kw)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 → (N, 3, S, S) float in [−1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_batch(ds: EmojiSet, vocab: WordVocab, batch_size: int, generator: torch.Generator, *,
                 flip: bool = True, word_dropout: float = 0.25, max_words: int = 16):
    """Random images (flipped half the time) and their names with some words dropped.

    Dropping words teaches the bag-of-words encoder that "cat face" is close to "GRINNING
    CAT FACE WITH SMILING EYES". Returns x (B, 3, S, S) in [−1, 1] and ids (B, L).
    """
    idx = torch.randint(0, len(ds), (batch_size,), generator=generator)
    x = to_tensor(ds.images[idx.numpy()])
    if flip:
        mask = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    texts = []
    for i in idx.tolist():
        ws = vocab.known(ds.names[i])
        keep = torch.rand(len(ws), generator=generator) >= word_dropout
        if ws and not keep.any():
            keep[torch.randint(0, len(ws), (1,), generator=generator)] = True
        texts.append(" ".join(w for w, k in zip(ws, keep.tolist()) if k))
    return x, vocab.batch(texts, max_words)


__all__ = ["EmojiSet", "load_emoji", "to_tensor", "sample_batch"]
