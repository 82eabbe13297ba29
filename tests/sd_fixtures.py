"""Small models with the exact structure of SD 1.x / 2.x (widths shrunk, SD's GroupNorm 32 and
head rules kept), so that files written from them are detected like real SD checkpoints."""

from __future__ import annotations

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetModel

UNET = {
    "sd1": dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_heads=8,
        context_dim=64,
        norm_groups=32,
    ),
    "sd2": dict(
        in_channels=4,
        out_channels=4,
        model_channels=64,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[1],
        num_head_channels=64,
        context_dim=64,
        use_linear_in_transformer=True,
        norm_groups=32,
    ),
}
VAE = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=32)
TEXT = {  # SD 1: CLIP conventions, no projection; SD 2: open_clip, penultimate layer
    "sd1": dict(
        text_cfg=dict(width=64, heads=1, layers=2, context_length=16, proj_type="none"),
        layer="last",
        pad_with_eot=True,
        quick_gelu=True,
    ),
    "sd2": dict(
        text_cfg=dict(width=64, heads=1, layers=3, context_length=16),
        layer="penultimate",
        pad_with_eot=False,
        quick_gelu=False,
    ),
}


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter perturbed (zero-initialised ones and norms included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def sd_parts(family: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {
        "unet": randomize_(UNetModel(**UNET[family]), seed).eval(),
        "vae": randomize_(AutoencoderKL(**VAE), seed + 1).eval(),
        "text_encoder": randomize_(TextEncoder(**TEXT[family]), seed + 2).eval(),
    }
