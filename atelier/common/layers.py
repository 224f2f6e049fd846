"""Layers and conversions shared by the image families (ddpm, dcgan, upscaler).

They sit at the bottom of the package so that no family imports another.
"""

from __future__ import annotations

import torch
from torch import nn


# -- batch-invariant layers ----------------------------------------------------------
# CPU GEMM kernels (nn.Linear, 1×1 convolutions) may sum in a different order for a
# different number of rows, so an image's last bits would depend on what shares its batch
# and micro-batching would break "same seed ⇒ same bytes". At inference these two layers
# use a batched matmul (bmm), which runs one identical small GEMM per sample. (3×3
# convolutions, GroupNorm and attention are already batch-invariant for even batch sizes;
# with classifier-free guidance the UNet always sees 2B rows.)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        w = self.weight.T.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, in, out)
        return torch.bmm(x.unsqueeze(1), w).squeeze(1) + self.bias


class Conv1x1(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        B, C, H, W = x.shape
        w = self.weight.view(self.out_channels, C).unsqueeze(0).expand(B, -1, -1)  # (B, out, C)
        return (torch.bmm(w, x.reshape(B, C, H * W)) + self.bias[:, None]).view(B, -1, H, W)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) in [−1, 1] → (B, S, S, C) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
