"""dcgan: a text-conditioned DCGAN (Radford et al. 2016) with a projection discriminator.

Read top to bottom: config → generator → discriminator → the model (text encoder +
generator + discriminator) → hinge losses → `generate()` → saving and loading.

Shapes: z (B, z_dim) ~ N(0, I) and the prompt vector (B, text_dim) are concatenated and
projected to a (4·g, 4, 4) map that transposed convolutions double to 8, 16, 32 pixels;
a tanh gives (B, 3, 32, 32) in [−1, 1]. The discriminator scores an image as
    D(x, c) = w · φ(x) + ⟨proj(c), φ(x)⟩          (Miyato & Koyama 2018)
with spectral normalisation on every layer. The text encoder is the one of the
`emoji-diffusion` model (copied, frozen), so both families read prompts the same way.

Only the generator and the text encoder are needed to sample; the discriminator is saved
in training checkpoints, not in the shipped weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils.parametrizations import spectral_norm

from atelier.common.layers import Linear, to_uint8  # batch-invariant Linear (see common/layers.py)
from atelier.models.text_encoder import VOCAB_FILE, TextEncoder, TextEncoderConfig, WordVocab

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class DcganConfig:
    image_size: int = 32
    channels: int = 3
    z_dim: int = 64
    g_channels: int = 64
    d_channels: int = 64
    vocab_size: int = 1000
    text_dim: int = 128
    max_words: int = 16

    def __post_init__(self):
        if self.image_size != 32:
            raise ValueError(f"image_size={self.image_size}: this DCGAN is built for 32×32")


class Generator(nn.Module):
    def __init__(self, c: DcganConfig):
        super().__init__()
        g = c.g_channels
        self.fc = Linear(c.z_dim + c.text_dim, 4 * g * 4 * 4)
        self.net = nn.Sequential(
            nn.BatchNorm2d(4 * g), nn.ReLU(),
            nn.ConvTranspose2d(4 * g, 2 * g, 4, 2, 1), nn.BatchNorm2d(2 * g), nn.ReLU(),  # 8×8
            nn.ConvTranspose2d(2 * g, g, 4, 2, 1), nn.BatchNorm2d(g), nn.ReLU(),  # 16×16
            nn.ConvTranspose2d(g, g, 4, 2, 1), nn.BatchNorm2d(g), nn.ReLU(),  # 32×32
            nn.Conv2d(g, c.channels, 3, padding=1), nn.Tanh())
        self.g = g

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, text], dim=1)).view(-1, 4 * self.g, 4, 4)
        return self.net(h)


class Discriminator(nn.Module):
    def __init__(self, c: DcganConfig):
        super().__init__()
        d = c.d_channels
        sn = spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(c.channels, d, 3, 1, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(d, 2 * d, 4, 2, 1)), nn.LeakyReLU(0.1),  # 16×16
            sn(nn.Conv2d(2 * d, 4 * d, 4, 2, 1)), nn.LeakyReLU(0.1),  # 8×8
            sn(nn.Conv2d(4 * d, 8 * d, 4, 2, 1)), nn.LeakyReLU(0.1))  # 4×4
        self.out = sn(nn.Linear(8 * d, 1))
        self.proj = sn(nn.Linear(c.text_dim, 8 * d))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum(dim=(2, 3))  # (B, 8d)
        return self.out(h).squeeze(1) + (self.proj(text) * h).sum(1)


class EmojiGAN(nn.Module):
    def __init__(self, config: DcganConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(TextEncoderConfig(config.vocab_size, config.text_dim, config.max_words))
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.generator.parameters()) + sum(p.numel() for p in self.text.parameters())


def d_hinge_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_hinge_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def latents(config: DcganConfig, seeds: list[int]) -> torch.Tensor:
    """z: one generator per image, so an image depends on its own seed only. (B, z_dim)."""
    return torch.stack([torch.randn(config.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(model: EmojiGAN, vocab: WordVocab, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Images for prompts (one per prompt), (B, 32, 32, 3) uint8.

    >>> generate(model, vocab, ["red apple"] * 2, seeds=[7, 8]).shape
    torch.Size([2, 32, 32, 3])
    """
    c, B = model.config, len(prompts)
    if len(seeds) != B:
        raise ValueError("prompts and seeds must have the same length")
    text = torch.cat([model.text(vocab.batch([p], c.max_words)) for p in prompts])
    z = latents(c, seeds)
    if B % 2:  # 3×3 convolutions are batch-invariant for even batch sizes only (see ddpm.py)
        z, text = torch.cat([z, z[:1]]), torch.cat([text, text[:1]])
    return to_uint8(model.generator(z, text)[:B])


# -- saving and loading -----------------------------------------------------------------


def save_pretrained(model: EmojiGAN, vocab: WordVocab, directory: str | Path) -> Path:
    """config.json, model.safetensors (text encoder + generator only) and vocab.json."""
    import safetensors.torch

    from atelier.common.files import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("discriminator.")}
    atomic_write_bytes(directory / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, {"family": "dcgan", **asdict(model.config)})
    vocab.save(directory / VOCAB_FILE)
    return directory


def config_from_dict(d: dict) -> DcganConfig:
    names = {f.name for f in fields(DcganConfig)}
    return DcganConfig(**{k: v for k, v in d.items() if k in names})


def from_pretrained(directory: str | Path) -> tuple[EmojiGAN, WordVocab]:
    """Rebuild the sampler (text encoder + generator) from its folder (never pickle)."""
    directory = Path(directory)
    config = config_from_dict(json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
    model = EmojiGAN(config)
    missing, unexpected = model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=False)
    if unexpected or any(not k.startswith("discriminator.") for k in missing):
        raise ValueError(f"{directory}: weights do not match the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval(), WordVocab.load(directory / VOCAB_FILE)


__all__ = ["DcganConfig", "EmojiGAN", "generate", "latents", "d_hinge_loss", "g_hinge_loss", "save_pretrained",
           "from_pretrained"]
