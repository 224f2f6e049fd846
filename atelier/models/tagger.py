"""tagger: a small convolutional network that names what a picture shows, as poem keywords.

Read top to bottom: config → the network → preparing a picture → tagging → saving and loading.

A multi-label classifier: four stages of 3×3 convolution, batch norm, ReLU and 2×2 max
pooling take a (3, S, S) picture to (w₄, S/16, S/16); a global average and one linear layer
give one logit per label, and a sigmoid gives each label's probability on its own (a picture
can show a smile and a heart). The labels live in the config, so a version always names what
its own weights learnt, whatever the lexicon in atelier/images/keywords.py says today.

Pictures are padded to a square with white and resized with LANCZOS, as the emoji it learns
from were (../shared/data/README.md), then scaled to [−1, 1].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from atelier.common.files import atomic_write_bytes

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TaggerConfig:
    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128, 256)
    dropout: float = 0.2
    labels: list[dict] = field(default_factory=list)  # [{"keyword", "gloss"}], one per output

    def __post_init__(self):
        self.widths = tuple(self.widths)
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f"image_size={self.image_size} must be divisible by {2 ** len(self.widths)}")
        if not self.labels:
            raise ValueError("a tagger needs at least one label")


class Tagger(nn.Module):
    def __init__(self, config: TaggerConfig):
        super().__init__()
        self.config = config
        layers, c = [], 3
        for w in config.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(c, len(config.labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [−1, 1] → (B, labels) logits."""
        return self.head(self.dropout(self.features(x).mean((2, 3))))


def prepare(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """Any RGB(A) picture → (3, size, size) in [−1, 1]: transparent parts white, padded square with white."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    side = max(im.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    x = np.asarray(square.resize((size, size), Image.LANCZOS), dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def tag(model: Tagger, image: Image.Image | np.ndarray) -> list[dict]:
    """Every label with its probability, most likely first: [{keyword, gloss, score}]."""
    model.eval()
    p = torch.sigmoid(model(prepare(image, model.config.image_size)[None]))[0]
    order = torch.argsort(p, descending=True).tolist()
    return [{**model.config.labels[i], "score": round(float(p[i]), 4)} for i in order]


def save_pretrained(model: Tagger, folder: Path) -> None:
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    atomic_write_bytes(folder / WEIGHTS_FILE, save(state))
    config = {"family": "image-tagger", **asdict(model.config)}
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2).encode())


def from_pretrained(folder: Path) -> Tagger:
    folder = Path(folder)
    raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    raw.pop("family", None)
    model = Tagger(TaggerConfig(**raw))
    # batch norm's step counters are not saved (they play no part in inference)
    loaded = model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=False)
    missing = [k for k in loaded.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{WEIGHTS_FILE} lacks {', '.join(sorted(missing)[:3])}")
    return model.eval()


__all__ = ["Tagger", "TaggerConfig", "from_pretrained", "prepare", "save_pretrained", "tag"]
