"""Served sizes and enlarging for the image families: the native size and ×2, ×4, ×8 of it.

`learned` doubles through the version's upscaler (atelier/models/upscaler.py), then repeats
pixels for the rest; `nearest` repeats pixels. Each image is enlarged alone, so its bytes
never depend on what shared its batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atelier.images.png import upscale as nearest
from atelier.models import upscaler

UPSCALES = (1, 2, 4, 8)


def image_sizes(config: dict) -> list[str]:
    """Sizes a model serves, e.g. ['32x32', '64x64', '128x128', '256x256'] (the first is native)."""
    s = int(config.get("image_size", 32))
    return [f"{s * f}x{s * f}" for f in UPSCALES]


def upscalers(files) -> list[str]:
    """How a version can enlarge its images, the default first: `learned` when it carries an
    upscaler, `nearest` (pixel-exact) always."""
    return (["learned"] if upscaler.WEIGHTS_FILE in files else []) + ["nearest"]


class Enlarger:
    """A version's way of enlarging: its upscaler network, if it carries one."""

    def __init__(self, folder: Path, config: dict):
        self.sizes = image_sizes(config)
        self.upscalers = upscalers({p.name for p in Path(folder).iterdir()})
        self.net = upscaler.from_pretrained(folder) if upscaler.available(folder) else None

    def enlarge(self, image: np.ndarray, factor: int, method: str | None) -> np.ndarray:
        """×factor: `learned` doubles through the upscaler, then nearest-neighbour for the rest."""
        if factor > 1 and method == "learned":
            image, factor = upscaler.upscale(self.net, image), factor // 2
        return nearest(image, factor)
