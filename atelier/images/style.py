"""Style transfer without downloaded weights: Gram matrices of random features, and colour statistics.

`gram` (Gatys et al. 2016 with the feature network of Ustyuzhaninov et al. 2016 / He et
al. 2016): a single layer of *random* convolution filters of several sizes, with ReLU,
applied at several scales of the image, is a feature space in which Gram matrices
G = F Fᵀ / (h·w) capture texture well enough for style transfer. The image is optimised
(Adam on pixels, starting from the content image) to minimise
    strength · L_style / L_style(content) + (1 − strength) · L_content / ‖F(content)‖²
    L_style   = Σ_maps mean((G(x) − G(style))²)     L_content = Σ_coarse maps ‖F(x) − F(content)‖²
The random filters are fixed once and shipped as the `style-transfer` model's weights
(model.safetensors), so results do not depend on a random number generator's version.

`color` (Reinhard et al. 2001): match the mean and standard deviation of each channel in
the decorrelated lαβ colour space, blended with the content by `strength`.

Both report style and content losses measured in the same random feature space.

    >>> features = RandomFeatures.from_pretrained("atelier/assets/models/style-transfer")
    >>> r = transfer(content, style, features, method="gram", strength=0.8, steps=60)
    >>> r.style_loss < r.style_loss_before
    True
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from atelier.config import PACKAGE_DIR

STYLES_DIR = PACKAGE_DIR / "assets" / "styles"
METHODS = ("patch", "gram", "color")
MAX_PATCH_PASSES = 12  # patch: more passes than this change nothing visible


# -- the styles that ship -----------------------------------------------------------------


def list_styles(root: Path = STYLES_DIR) -> dict[str, dict]:
    """Style name → its provenance (artist, title, year, source), from styles.json."""
    return json.loads((root / "styles.json").read_text(encoding="utf-8"))["styles"]


def normalise_style_name(name: str) -> str:
    """'Vangogh Starry-Night' → 'vangogh_starry_night'."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def load_style(name: str, root: Path = STYLES_DIR) -> Image.Image:
    styles = list_styles(root)
    key = normalise_style_name(name)
    if key not in styles:
        raise KeyError(f"unknown style {name!r}; styles: {', '.join(sorted(styles))}")
    return Image.open(root / styles[key]["file"]).convert("RGB")


# -- random features ------------------------------------------------------------------------


@dataclass
class FeatureConfig:
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 5, 7])
    filters: int = 32  # per kernel size
    scales: list[int] = field(default_factory=lambda: [1, 2, 4])  # image downsampled by these factors
    content_scales: list[int] = field(default_factory=lambda: [2, 4])  # coarse maps keep the layout
    seed: int = 0


class RandomFeatures:
    """Multi-scale random conv features: image (1, 3, H, W) in [0, 1] → {(scale, k): (1, filters, h, w)}."""

    def __init__(self, config: FeatureConfig, weights: dict[str, torch.Tensor] | None = None):
        self.config = config
        if weights is None:
            g = torch.Generator().manual_seed(config.seed)
            weights = {}
            for k in config.kernel_sizes:
                w = torch.randn(config.filters, 3, k, k, generator=g) / (3 * k * k) ** 0.5
                weights[f"conv{k}.weight"] = w - w.mean(dim=(1, 2, 3), keepdim=True)  # zero-mean filters
                weights[f"conv{k}.bias"] = torch.zeros(config.filters)
        self.weights = weights

    def __call__(self, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        x = (x - 0.5) / 0.25
        out = {}
        for s in self.config.scales:
            xs = F.avg_pool2d(x, s) if s > 1 else x
            for k in self.config.kernel_sizes:
                out[(s, k)] = F.relu(F.conv2d(xs, self.weights[f"conv{k}.weight"], self.weights[f"conv{k}.bias"],
                                              padding=k // 2))
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        import safetensors.torch

        from atelier.common.files import atomic_write_bytes, atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "model.safetensors",
                           safetensors.torch.save({k: v.contiguous() for k, v in self.weights.items()},
                                                  metadata={"format": "pt"}))
        atomic_write_json(directory / "config.json", {"family": "gram", **asdict(self.config)})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "RandomFeatures":
        directory = Path(directory)
        d = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        config = FeatureConfig(**{k: v for k, v in d.items() if k in FeatureConfig.__dataclass_fields__})
        return cls(config, load_file(directory / "model.safetensors"))


def gram(f: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) → (C, C) = F Fᵀ / (h·w)."""
    _, c, h, w = f.shape
    m = f.reshape(c, h * w)
    return m @ m.T / (h * w)


# -- transfer -------------------------------------------------------------------------------


@dataclass
class StyleResult:
    image: np.ndarray  # (H, W, 3) uint8
    method: str
    style_loss_before: float  # of the content image
    style_loss: float  # of the result
    content_loss: float  # of the result (0 for the content image)
    steps: int
    seconds: float


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    a = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def fit_size(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale (never up) so the longest side is at most max_side."""
    w, h = image.size
    f = min(1.0, max_side / max(w, h))
    return image if f == 1.0 else image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)


class _Losses:
    def __init__(self, features: RandomFeatures, content: torch.Tensor, style: torch.Tensor):
        self.features = features
        with torch.no_grad():
            self.style_grams = {k: gram(f) for k, f in features(style).items()}
            fc = features(content)
            self.content_feats = {k: fc[k] for k in fc if k[0] in features.config.content_scales}
            self.content_norm = sum(float((f ** 2).sum()) for f in self.content_feats.values())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fx = self.features(x)
        style = sum(((gram(f) - self.style_grams[k]) ** 2).mean() for k, f in fx.items())
        content = sum(((fx[k] - f) ** 2).sum() for k, f in self.content_feats.items())
        return style, content


def rgb_to_lab(x: np.ndarray) -> np.ndarray:
    """Reinhard's lαβ: RGB → LMS → log10 → decorrelated axes. x (..., 3) in (0, 1]."""
    rgb2lms = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
    lms = np.log10(np.clip(x @ rgb2lms.T, 1e-4, None))
    m = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
    return lms @ m.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    m = np.array([[1, 1, 1], [1, 1, -1], [1, -2, 0]]) @ np.diag([np.sqrt(3) / 3, np.sqrt(6) / 6, np.sqrt(2) / 2])
    lms = 10 ** (lab @ m.T)
    lms2rgb = np.array([[4.4679, -3.5873, 0.1193], [-1.2186, 2.3809, -0.1624], [0.0497, -0.2439, 1.2045]])
    return lms @ lms2rgb.T


def reinhard(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """Colour transfer: per-channel mean/std of style imposed on content in lαβ. float (H, W, 3) in [0, 1]."""
    c, s = rgb_to_lab(content.astype(np.float64) + 1 / 255), rgb_to_lab(style.astype(np.float64) + 1 / 255)
    cm, cs = c.reshape(-1, 3).mean(0), c.reshape(-1, 3).std(0) + 1e-6
    sm, ss = s.reshape(-1, 3).mean(0), s.reshape(-1, 3).std(0)
    return np.clip(lab_to_rgb((c - cm) / cs * ss + sm) - 1 / 255, 0, 1)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) → (1, 1, H, W), Rec. 601 weights."""
    return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def patch_transfer(content: torch.Tensor, style: torch.Tensor, *, strength: float = 0.8, passes: int = 12,
                   patch: int = 7, levels: int = 3) -> torch.Tensor:
    """Guided texture optimisation (Kwatra et al. 2005, with Hertzmann et al. 2001's luminance guide):
    the result is rebuilt from the painting's own patches, so its brushwork is the painting's.

    Coarse to fine over `levels` scales (each twice the last), `passes` in all: every overlapping
    patch of the result is replaced by the painting patch nearest to it, by colour and by how
    well the painting patch's luminance matches the content's there, and the overlaps are
    averaged. The guide's weight falls as `strength` rises, so strength trades the content's
    structure for the painting's texture. It starts from the content recoloured with the
    painting's palette (Reinhard). (1, 3, H, W) in [0, 1] → the same shape."""
    H, W = content.shape[-2:]
    sh, sw = style.shape[-2:]
    cn, sn = content[0].permute(1, 2, 0).numpy(), style[0].permute(1, 2, 0).numpy()
    x = torch.from_numpy(reinhard(cn, sn).astype(np.float32)).permute(2, 0, 1)[None]
    # The content's luminance, matched to the painting's mean and spread: the guide compares like with like.
    lc, ls = luminance(content), luminance(style)
    lc = (lc - lc.mean()) / (lc.std() + 1e-6) * ls.std() + ls.mean()
    guide = 3.0 + 20.0 * (1 - strength)  # the guide weighs this much more per dimension than colour
    per_level = [passes // levels + (i < passes % levels) for i in range(levels)]
    for level in range(levels):
        f = 2 ** (levels - 1 - level)
        size = (max(patch, H // f), max(patch, W // f))
        s_size = (max(patch, sh // f), max(patch, sw // f))
        xs = _resize(x, size)
        gs = _resize(lc, size)
        sty, sguide = _resize(style, s_size), _resize(ls, s_size)
        # the painting's patches (stride 2 at full size), colour and guide side by side, weighted
        bank = torch.cat([F.unfold(sty, patch, stride=2 if f == 1 else 1),
                          guide ** 0.5 * F.unfold(sguide, patch, stride=2 if f == 1 else 1)], 1)[0].T  # (M, D)
        bank_sq = (bank ** 2).sum(1)
        colour_dims = 3 * patch * patch
        stride = max(1, patch // 3)  # much overlap: averaging it hides the patches' seams
        ones = F.fold(torch.ones(1, patch * patch, F.unfold(gs, patch, stride=stride).shape[-1]), size, patch,
                      stride=stride)
        g = guide ** 0.5 * F.unfold(gs, patch, stride=stride)
        for _ in range(per_level[level]):
            q = torch.cat([F.unfold(xs, patch, stride=stride), g], 1)[0].T  # (N, D)
            # ‖q‖² is the same for every candidate; chunks bound the (queries × bank) matrix to ~64 MB
            chunk = max(1, (1 << 24) // len(bank))
            nearest = torch.cat([(bank_sq[None] - 2 * q[i:i + chunk] @ bank.T).argmin(1)
                                 for i in range(0, len(q), chunk)])
            chosen = bank[nearest, :colour_dims].T[None]  # (1, 3·k², N)
            # pixels no patch covers (the right/bottom edge when the stride does not divide) keep theirs
            covered = ones > 0
            xs = torch.where(covered, F.fold(chosen, size, patch, stride=stride) / ones.clamp(min=1), xs)
        x = xs
    return _resize(x, (H, W)).clamp(0, 1) if x.shape[-2:] != (H, W) else x.clamp(0, 1)


def transfer(content: Image.Image, style: Image.Image, features: RandomFeatures, *, method: str = "gram",
             strength: float = 0.8, steps: int = 60, max_side: int = 128, lr: float = 0.03,
             should_stop=lambda: False) -> StyleResult:
    """Restyle `content` after `style`; the result has the content's aspect, longest side ≤ max_side."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength={strength} must be between 0 and 1")
    started = time.perf_counter()
    c = to_tensor(fit_size(content, max_side))
    s = to_tensor(fit_size(style, max_side))
    losses = _Losses(features, c, s)
    with torch.no_grad():
        style_before = float(losses(c)[0])
    if method == "color":
        cn, sn = c[0].permute(1, 2, 0).numpy(), s[0].permute(1, 2, 0).numpy()
        out = (1 - strength) * cn + strength * reinhard(cn, sn)
        x = torch.from_numpy(out.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
        steps = 0
    elif method == "patch":
        steps = max(3, min(steps, MAX_PATCH_PASSES))
        x = patch_transfer(c, s, strength=strength, passes=steps)
    else:
        # 1. start from the content image; 2. Adam on pixels; 3. keep pixels in [0, 1]
        x = c.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for i in range(steps):
            if should_stop():
                steps = i
                break
            st, ct = losses(x)
            loss = strength * st / max(style_before, 1e-12) + (1 - strength) * ct / max(losses.content_norm, 1e-12)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        x = x.detach()
    # measure on the image as it will be saved (uint8)
    image = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with torch.no_grad():
        st, ct = losses(to_tensor(image))
    return StyleResult(image, method, style_before, float(st), float(ct) / max(losses.content_norm, 1e-12), steps,
                       time.perf_counter() - started)


__all__ = ["RandomFeatures", "FeatureConfig", "StyleResult", "transfer", "reinhard", "list_styles", "load_style",
           "normalise_style_name", "METHODS", "STYLES_DIR"]
