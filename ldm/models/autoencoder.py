"""First-stage KL autoencoder of Stable Diffusion, in plain PyTorch.

The module tree reproduces the original CompVis layout (``Encoder`` / ``Decoder`` of
``ldm/modules/diffusionmodules/model.py`` plus ``AutoencoderKL``) parameter for
parameter, so the ``first_stage_model.*`` tensors of a Stable Diffusion checkpoint load
by name with ``strict=True``. Sizes come from constructor arguments, which lets tests and
small experiments build tiny models with the same code path.

Images live in [-1, 1]. ``encode`` returns *scaled* latents ``(z - shift) * scale`` (the
space the diffusion model sees) and ``decode`` undoes that before decoding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.layers import Upsample  # the same nearest x2 + conv in both SD models

_log = logging.getLogger(__name__)

# SD clamps the log-variance so exp() can neither overflow nor collapse to 0.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# GroupNorm epsilon of the SD first stage (PyTorch's default is 1e-5).
NORM_EPS = 1e-6


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


# Stable Diffusion's latent scale (Rombach et al., 2022: latents rescaled to about unit variance),
# the default of every file that does not say otherwise.
SD_SCALE_FACTOR = 0.18215
SDXL_SCALE_FACTOR = 0.13025  # SDXL's VAE: same shape, retrained, other latent scale


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1 projected if needed) skip.

    The SD first stage has no timestep embedding, so unlike the UNet block there is no
    ``temb_proj``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # SD names the 1x1 skip projection "nin_shortcut" (network-in-network).
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions.

    q/k/v/proj_out are 1x1 convolutions (not Linear) to match SD's parameter shapes.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose tokens are the pixels.
        q, k, v = (
            proj(normed).reshape(b, 1, c, h * w).transpose(-1, -2)
            for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale 1/sqrt(C) as SD
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right/bottom, as SD does.

    The asymmetric (0, 1, 0, 1) pad halves even sizes exactly; symmetric padding would
    shift the sampling grid and break checkpoint compatibility.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (+ optional ``attn``) and an optional resampler.

    Attribute names (``block``, ``attn``, ``downsample``/``upsample``) are SD's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        use_attn: bool,
        dropout: float,
        groups: int,
    ):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for j in range(num_blocks):
            block_in = in_channels if j == 0 else out_channels
            self.block.append(ResnetBlock(block_in, out_channels, dropout, groups))
            if use_attn:
                self.attn.append(AttnBlock(out_channels, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, curr_res = ch, resolution
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            level = Level(
                block_in,
                block_out,
                num_res_blocks,
                curr_res in attn_resolutions,
                dropout,
                norm_groups,
            )
            if i != len(ch_mult) - 1:  # every level but the last halves the resolution
                level.downsample = Downsample(block_out)
                curr_res //= 2
            self.down.append(level)
            block_in = block_out
        self.mid = MidBlock(block_in, dropout, norm_groups)
        self.norm_out = _norm(block_in, norm_groups)
        # Twice z_channels: mean and log-variance of the diagonal Gaussian posterior.
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout, norm_groups)
        # Built from the lowest resolution up, but stored so that up[i] is the level with
        # ch_mult[i] channels (up[-1] is the lowest resolution), exactly as SD indexes it.
        levels: list[Level] = []
        for i in reversed(range(num_levels)):
            block_out = ch * ch_mult[i]
            # One more block than the encoder, as in SD.
            level = Level(
                block_in,
                block_out,
                num_res_blocks + 1,
                curr_res in attn_resolutions,
                dropout,
                norm_groups,
            )
            if i != 0:  # every level but the highest-resolution one doubles the resolution
                level.upsample = Upsample(block_out)
                curr_res *= 2
            levels.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h*f, w*f)


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) built from the encoder moments.

    ``moments`` is (B, 2*C, h, w): the first C channels are the mean, the rest the
    log-variance.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # each (B, C, h, w)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all non-batch dims -> (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return kl.sum(dim=tuple(range(1, kl.ndim)))


class AutoencoderKL(nn.Module):
    """Stable Diffusion's KL-regularised first-stage autoencoder.

    The defaults are the SD 1.x/2.x VAE (83,653,863 parameters). ``scale_factor`` and
    ``shift_factor`` map raw latents z to the diffusion space ``(z - shift) * scale``; they
    are plain attributes (not buffers) so they never appear in the state dict, like SD,
    and can be set after training from measured latent statistics.

    ``fp16_safe=False`` marks weights whose activations overflow float16 (SDXL's VAE: its
    images come out NaN, i.e. black, in fp16): such a VAE encodes and decodes in float32
    whenever it meets float16 (fp16 weights, or a float16 autocast), and bf16 stays as it is.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
        scale_factor: float = SD_SCALE_FACTOR,
        shift_factor: float = 0.0,
        fp16_safe: bool = True,
    ):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self._arch = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            ch=ch,
            ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            embed_dim=embed_dim,
            attn_resolutions=list(attn_resolutions),
            resolution=resolution,
            dropout=dropout,
            norm_groups=norm_groups,
        )
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.fp16_safe = bool(fp16_safe)
        shared = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            dropout=dropout,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_channels=out_channels, **shared)
        # 1x1 convs between the encoder/decoder width (z_channels) and the latent (embed_dim).
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor kwargs rebuilding this model (current scale/shift)."""
        return {
            **self._arch,
            "scale_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
            "fp16_safe": self.fp16_safe,
        }

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self._arch["ch_mult"]) - 1)

    def _float32_if_unsafe(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """Where this VAE is not fp16-safe and meets float16, its weights become float32 (once:
        a frozen part) and the call runs without autocast; anything else runs as it is."""
        if self.fp16_safe:
            return contextlib.nullcontext()
        device = x.device.type
        autocast_fp16 = (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        )
        if self.quant_conv.weight.dtype == torch.float16:
            _log.info("VAE weights upcast to float32: this VAE overflows float16 (fp16_safe=false)")
            self.float()
        elif not autocast_fp16:
            return contextlib.nullcontext()
        return torch.autocast(device, enabled=False)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, C, H, W) in [-1, 1] -> q(z|x) over (B, embed_dim, H/f, W/f), computed in the
        weights' dtype (float32 inputs meet bf16 weights in a bf16-true run)."""
        with self._float32_if_unsafe(x):
            h = self.encoder(x.to(self.quant_conv.weight.dtype))
            return DiagonalGaussian(self.quant_conv(h))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale_factor + self.shift_factor

    def encode(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Image (B, C, H, W) -> scaled latents (B, embed_dim, H/f, W/f)."""
        posterior = self.posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_latents(z)

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, embed_dim, h, w) -> image (B, out_channels, h*f, w*f)."""
        with self._float32_if_unsafe(z):
            return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, embed_dim, h, w) -> image (B, out_channels, h*f, w*f)."""
        return self.decode_unscaled(self.unscale_latents(latents))

    def forward(
        self, x: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x (B, C, H, W); the scale/shift cancel out so they are skipped."""
        posterior = self.posterior(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode_unscaled(z), posterior
