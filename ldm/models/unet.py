"""The Stable Diffusion U-Net (``UNetModel`` of the original ``openaimodel.py``).

One class covers tiny test models as well as SD 1.x and SD 2.x through its
constructor arguments, which use the names of the original YAML configs.
Module and parameter names match the original layout exactly, so an original
checkpoint (with its ``model.diffusion_model.`` prefix stripped) loads with
``load_state_dict(..., strict=True)``.

Layout, for ``channel_mult=[1, 2, 4, 4]`` and ``num_res_blocks=2``::

    input_blocks.0            conv_in
    input_blocks.1..2         ResBlock [+ SpatialTransformer]   level 0
    input_blocks.3            Downsample
    ...                       (repeated per level, no Downsample after the last)
    middle_block.0/1/2        ResBlock, SpatialTransformer, ResBlock
    output_blocks.0..2        ResBlock [+ SpatialTransformer] [+ Upsample]
    ...                       (levels in reverse, num_res_blocks + 1 each)
    out.0 / out.2             GroupNorm, SiLU, conv_out
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import SpatialTransformer
from ldm.models.layers import GroupNorm32, Upsample, use_checkpointing, zero_module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding, exactly as Stable Diffusion computes it.

    Cosines come first, then sines; frequencies are
    ``exp(-log(max_period) * arange(half) / half)``. Returns (B, dim) float32.
    """
    half = dim // 2
    exponent = (
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    freqs = torch.exp(exponent)  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))  # (B, dim)
    return embedding


def micro_conditioning(time_ids: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's micro-conditioning (B, k) -> (B, k * dim): each number (original height, width,
    crop top, left, target height, width) Fourier-embedded as a timestep is; concatenated after
    the pooled text embedding, it is the U-Net's vector conditioning `y`."""
    return timestep_embedding(time_ids.flatten(), dim).reshape(time_ids.shape[0], -1)


def per_level(depth: int | Sequence[int], levels: int) -> tuple[int, ...]:
    """The transformer depth of each level from one number or a list of one per level."""
    depths = (depth,) * levels if isinstance(depth, int) else tuple(depth)
    if len(depths) != levels:
        raise ValueError(f"transformer_depth has {len(depths)} entries for {levels} levels")
    return depths


class ResBlock(nn.Module):
    """Residual block whose features are shifted by the timestep embedding."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            # Zero init: the block starts as its skip connection.
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if use_checkpointing(self.use_checkpoint, self):
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W); emb: (B, emb_channels)
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # broadcast over H, W
        h = self.out_layers(h)  # (B, C_out, H, W)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands each layer the inputs it needs (emb, context or neither)."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Stable Diffusion U-Net: ``forward(x, timesteps, context) -> prediction``.

    Args (names as in the original YAML configs):
        in_channels / out_channels: latent channels in and out (4 for SD).
        model_channels: base width (320 for SD).
        channel_mult: width multiplier per resolution level.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: downsample factors (1, 2, 4, ...) that get a
            SpatialTransformer after each ResBlock.
        num_heads / num_head_channels: a fixed head count (SD 1.x), or a fixed
            head width with heads = channels // num_head_channels (SD 2.x).
        context_dim: width of the cross-attention context (text embeddings).
        transformer_depth: transformer blocks per SpatialTransformer: one number, or one per
            level (SDXL: [0, 2, 10]; a level without attention ignores its entry); the middle
            block takes the last level's.
        adm_in_channels: width of the vector conditioning `y` added to the time embedding
            through `label_emb` (SDXL: 2816, the pooled text embedding and the Fourier-embedded
            micro-conditioning, `micro_conditioning`); None: no vector conditioning.
        use_linear_in_transformer: linear instead of 1x1 conv projections (SD 2.x).
        dropout: dropout inside ResBlocks and transformers.
        use_checkpoint: gradient checkpointing of ResBlocks and transformer
            blocks while training.
        norm_groups: GroupNorm groups (32 in SD; fewer for tiny test models).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_heads: int = -1,
        num_head_channels: int = -1,
        context_dim: int | None = None,
        transformer_depth: int | Sequence[int] = 1,
        use_linear_in_transformer: bool = False,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
        adm_in_channels: int | None = None,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("Set either num_heads or num_head_channels.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.attention_resolutions = tuple(attention_resolutions)
        self.transformer_depth = per_level(transformer_depth, len(channel_mult))
        self._block_kwargs = dict(
            dropout=dropout, norm_groups=norm_groups, use_checkpoint=use_checkpoint
        )
        self._transformer_kwargs = dict(
            context_dim=context_dim,
            dropout=dropout,
            use_linear=use_linear_in_transformer,
            norm_groups=norm_groups,
            use_checkpoint=use_checkpoint,
        )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if adm_in_channels is not None:  # SD layout: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )

        self.input_blocks, skips = self._down_path(in_channels, channel_mult, num_res_blocks)
        ch = skips[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, ch, **self._block_kwargs),
            self._spatial_transformer(ch, self.transformer_depth[-1]),
            ResBlock(ch, time_embed_dim, ch, **self._block_kwargs),
        )
        self.output_blocks = self._up_path(skips, channel_mult, num_res_blocks)
        self.out = nn.Sequential(
            GroupNorm32(norm_groups, model_channels * channel_mult[0]),  # the up path's width
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def _down_path(
        self, in_channels: int, channel_mult: Sequence[int], num_res_blocks: int
    ) -> tuple[nn.ModuleList, list[int]]:
        """conv_in, then per level `num_res_blocks` ResBlocks (+ attention) and a Downsample
        (but on the last level); with the width of every block's output, which the up path
        concatenates back in reverse order."""
        mc, emb = self.model_channels, self.model_channels * 4
        blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(
                    TimestepEmbedSequential(
                        *self._res_and_attention(
                            ch, mc * mult, emb, ds, self.transformer_depth[level]
                        )
                    )
                )
                ch = mc * mult
                skips.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        return blocks, skips

    def _up_path(
        self, skips: list[int], channel_mult: Sequence[int], num_res_blocks: int
    ) -> nn.ModuleList:
        """One more block per level than on the way down, so that every skip (conv_in's and the
        Downsamples' included) is consumed; an Upsample ends each level but the last."""
        mc, emb = self.model_channels, self.model_channels * 4
        skips, blocks = list(skips), nn.ModuleList()
        ch, ds = skips[-1], 2 ** (len(channel_mult) - 1)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                depth = self.transformer_depth[level]
                layers = self._res_and_attention(ch + skips.pop(), mc * mult, emb, ds, depth)
                ch = mc * mult
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def _heads(self, ch: int) -> tuple[int, int]:
        """(number of heads, head width) for a transformer of width ``ch``."""
        if self.num_head_channels != -1:
            return ch // self.num_head_channels, self.num_head_channels
        return self.num_heads, ch // self.num_heads

    def _spatial_transformer(self, ch: int, depth: int) -> SpatialTransformer:
        heads, dim_head = self._heads(ch)
        return SpatialTransformer(ch, heads, dim_head, depth=depth, **self._transformer_kwargs)

    def _res_and_attention(
        self, in_ch: int, out_ch: int, emb_ch: int, ds: int, depth: int
    ) -> list[nn.Module]:
        """A ResBlock, followed by a SpatialTransformer of `depth` blocks at attention
        resolutions."""
        layers: list[nn.Module] = [ResBlock(in_ch, emb_ch, out_ch, **self._block_kwargs)]
        if ds in self.attention_resolutions:
            layers.append(self._spatial_transformer(out_ch, depth))
        return layers

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W); timesteps: (B,) or scalar, int or float;
        context: (B, L, context_dim); y: (B, adm_in_channels), the vector conditioning of a model
        that has one (SDXL). Returns (B, out_channels, H, W).

        H and W must be divisible by 2 ** (len(channel_mult) - 1).
        """
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype  # inputs in the weights' dtype: bf16-true runs
        t_emb = timestep_embedding(timesteps, self.model_channels)  # (B, model_channels) float32
        emb = self.time_embed(t_emb.to(dtype))  # (B, 4 * model_channels)
        if hasattr(self, "label_emb") != (y is not None):
            raise ValueError(
                "this U-Net takes a vector conditioning y (adm_in_channels)"
                if y is None
                else "y given, but this U-Net has no vector conditioning (adm_in_channels=None)"
            )
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = None if context is None else context.to(dtype)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_max, H / 2^k, W / 2^k)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = block(h, emb, context)
        return self.out(h)  # (B, out_channels, H, W)
