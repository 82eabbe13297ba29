"""Samplers as pure functions over a denoiser `denoiser(x_t, t) -> (x0, eps)`.

Each takes the starting noise `x`, the descending integer timesteps and the schedule's
alpha_bar, plus an optional `generator` for the randomness it needs, so results are
deterministic for a seed.
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.guidance import Denoiser

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: list[int],
                alphas_cumprod: torch.Tensor, *, eta: float = 0.0,
                generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al., 2021, Eq. 12); eta=0 is deterministic, eta=1 matches DDPM's variance."""
    ab = alphas_cumprod.to(x.device, torch.float32)
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(ab_t)
        x0, eps = denoiser(x, t)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i, x, x0)
    return x


SAMPLERS = {"ddim": sample_ddim}
