"""Transformer pieces of the Stable Diffusion U-Net.

Module and parameter names follow the original Stable Diffusion
``ldm/modules/attention.py`` layout exactly (``to_q``, ``to_out.0``,
``ff.net.0.proj``, ``norm1``...), so original checkpoints load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.layers import GroupNorm32, use_checkpointing, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, dim_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, query_dim); context: (B, L, context_dim) or None
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))  # (B, heads, N, dim_head)
        k = self._split_heads(self.to_k(context))  # (B, heads, L, dim_head)
        v = self._split_heads(self.to_v(context))  # (B, heads, L, dim_head)
        # Default scale is dim_head ** -0.5, the same as Stable Diffusion.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim_head)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, inner_dim)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU: one projection yields both the value and its gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Value first, gate second: the order the original weights were trained with.
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, dim_out)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width (``net.0.proj`` / ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if use_checkpointing(self.use_checkpoint, self):
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, dim)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context``.

    SD 1.x projects in/out with 1x1 convolutions, SD 2.x with linear layers
    (``use_linear``); both are the same map, only the weight shapes differ.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        # eps=1e-6 here (not GroupNorm's 1e-5) as in the original.
        self.norm = GroupNorm32(norm_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dropout, use_checkpoint)
            for _ in range(depth)
        )
        # Zero init: the block starts as identity on the residual stream.
        self.proj_out = zero_module(proj_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); context: (B, L, context_dim)
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        # Contiguous tokens (and feature map below), as in the original: a
        # transposed view would otherwise reach later convolutions with
        # channels-last strides, changing kernels and rounding.
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, C or inner)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()  # (B, C or inner, H, W)
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + residual
