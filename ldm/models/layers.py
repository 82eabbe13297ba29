"""Layers shared by the U-Net, its attention blocks and the VAE (Stable Diffusion's own forms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32.

    Group statistics over many elements are inaccurate in half precision;
    computing them in float32 and casting back keeps bf16/fp16 training stable
    (same behaviour as Stable Diffusion's ``GroupNorm32``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weights are upcast too, so this also works on a model cast to bf16.
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters so the module starts as a no-op on its residual branch."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def use_checkpointing(enabled: bool, module: nn.Module) -> bool:
    """Checkpoint only when it can save memory: training with autograd on."""
    return enabled and module.training and torch.is_grad_enabled()


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)
