"""upscaler: a small learned ×2 super-resolution network (32×32 → 64×64) for the image families.

Read top to bottom: config → residual block → the network → `upscale()` → saving and loading.

The network predicts a residual over bilinear interpolation, ESPCN-style (Shi et al. 2016):

    y = bilinear×2(x) + PixelShuffle₂(conv(ResBlocks(conv(x))))

so an untrained network already gives a bilinear image and training only adds the detail
that interpolation smears (edges, outlines, eyes). It is trained on pairs of the emoji set
(`emoji32.npz` → `emoji64.npz`, the same design split as the generators) by
atelier/training/upscaler_trainer.py.

An image model's version may carry one (`upscaler.json` + `upscaler.safetensors` beside its
own files); the image route then serves twice the native size through it. Each
image is upscaled alone (batch of one), so a result never depends on what it was batched
with: same request, same seed, same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from atelier.common.layers import to_uint8  # the same rounding as the generators' output

# Named so that they sit beside an image model's own config.json and model.safetensors.
WEIGHTS_FILE = "upscaler.safetensors"
CONFIG_FILE = "upscaler.json"


@dataclass
class UpscalerConfig:
    channels: int = 48
    num_blocks: int = 6
    scale: int = 2

    def __post_init__(self):
        if self.channels < 1 or self.num_blocks < 0 or self.scale not in (2, 4):
            raise ValueError("upscaler: channels ≥ 1, num_blocks ≥ 0 and scale ∈ {2, 4}")


class ResBlock(nn.Module):
    """conv → ReLU → conv, plus the input (no normalisation: nothing couples the images of a batch)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Upscaler(nn.Module):
    def __init__(self, config: UpscalerConfig):
        super().__init__()
        self.config = c = config
        self.head = nn.Conv2d(3, c.channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(c.channels) for _ in range(c.num_blocks)])
        self.tail = nn.Conv2d(c.channels, 3 * c.scale ** 2, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as plain bilinear interpolation
        nn.init.zeros_(self.tail.bias)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [−1, 1] → (B, 3, S·scale, S·scale), not clamped (the loss sees the overshoot)."""
        base = F.interpolate(x, scale_factor=self.config.scale, mode="bilinear", align_corners=False)
        h = F.relu(self.head(x))
        return base + F.pixel_shuffle(self.tail(self.blocks(h)), self.config.scale)


def _from_uint8(image: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 → (1, 3, S, S) in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


@torch.no_grad()
def upscale(model: Upscaler, image: np.ndarray) -> np.ndarray:
    """One (S, S, 3) uint8 image → (S·scale, S·scale, 3) uint8."""
    return to_uint8(model(_from_uint8(image)))[0].numpy()


def bilinear(image: np.ndarray, scale: int = 2) -> np.ndarray:
    """The baseline the network improves on, with the same rounding."""
    y = F.interpolate(_from_uint8(image), scale_factor=scale, mode="bilinear", align_corners=False)
    return to_uint8(y)[0].numpy()


def save_pretrained(model: Upscaler, directory: str | Path) -> Path:
    import safetensors.torch

    from atelier.common.files import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, {"family": "upscaler", **asdict(model.config)})
    return directory


def available(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_FILE).exists() and (Path(directory) / CONFIG_FILE).exists()


def from_pretrained(directory: str | Path) -> Upscaler:
    """Rebuild from config.json + model.safetensors (never pickle); strict about the weights."""
    directory = Path(directory)
    d = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    names = {f.name for f in fields(UpscalerConfig)}
    model = Upscaler(UpscalerConfig(**{k: v for k, v in d.items() if k in names}))
    model.load_state_dict(load_file(directory / WEIGHTS_FILE))
    return model.eval()


__all__ = ["UpscalerConfig", "Upscaler", "upscale", "bilinear", "save_pretrained", "from_pretrained", "available"]
