"""Weight-only int8: how a quantized version stores its weights, and how they come back as floats.

Every float matrix with at least MIN_ELEMENTS elements is stored as int8 with one fp32 scale per
row (symmetric: q = round(w / s), s = max|row| / 127), beside it under `<name>.int8_scale`; small
tensors (biases, LayerNorms) stay as they were. A model loads by dequantizing (w ≈ q · s), so every
path that runs fp32 (training, prefill through the modules, the Python decoder) runs as before. The
native decoding step (atelier/common/native/) also reads the int8 matrices themselves for steps of a
few rows, a quarter of the bytes: 1.9× faster for a single stream of tang-poet on this CPU, where
torchao's and aten's int8 kernels were no faster than fp32 (benchmarks/compress_eval.py)."""

from __future__ import annotations

import torch

SCALE = ".int8_scale"
MIN_ELEMENTS = 4096
CONFIG_KEY = "atelier_quantization"  # in config.json: {"method": "int8", "scheme": …, "tensors": n}


def quantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if t.dtype.is_floating_point and t.dim() == 2 and t.numel() >= MIN_ELEMENTS:
            w = t.float()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
            out[name] = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[name + SCALE] = scale.contiguous()
        else:
            out[name] = t
    return out


def dequantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floats again for every tensor that has a scale beside it; a dict without any comes back as it was."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(SCALE):
            continue
        scale = tensors.get(name + SCALE)
        out[name] = t.float() * scale[:, None] if scale is not None else t
    return out


def quantized_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(1 for name in tensors if name.endswith(SCALE))
