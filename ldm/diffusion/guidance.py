"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper that turns a U-Net into a denoiser.

A denoiser is `denoiser(x_t, t, alpha_bar) -> (x0, eps)`: what every sampler in `samplers.py`
consumes. t is the network's (float) timestep, alpha_bar the noise level x_t is at; the sampler
gives both because a Karras-spaced sigma sits between training steps. Conditional and
unconditional branches go through the network in one batched call.
"""

from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.conditioning import Condition, ModelFn, apply, cat
from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedule import NoiseSchedule

Denoiser = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def guide(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0
) -> torch.Tensor:
    """uncond + scale (cond - uncond), optionally rescaled toward cond's std (Lin et al., 2023,
    Eq. 15)."""
    guided = uncond + scale * (cond - uncond)
    if rescale:
        dims = tuple(range(1, cond.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


def make_denoiser(
    model: ModelFn,
    schedule: NoiseSchedule,
    prediction: str | Prediction,
    context: Condition,
    uncond_context: Condition | None = None,
    cfg_scale: float = 1.0,
    cfg_rescale: float = 0.0,
) -> Denoiser:
    """Wrap `model(x, t, context)` into a guided denoiser `denoiser(x_t, t, alpha_bar=None)`.
    `context` and `uncond_context` are conditions (`ldm.diffusion.conditioning`): a text context,
    or the dict of an SDXL U-Net's context and vector y.

    t may be fractional (the network gets float timesteps); alpha_bar defaults to the schedule's
    value at an integer t.
    """
    guided = uncond_context is not None and cfg_scale != 1.0
    prediction = Prediction.parse(prediction)

    def denoiser(x: torch.Tensor, t, alpha_bar=None) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if alpha_bar is None:
            if float(t) != int(t):
                raise ValueError(f"alpha_bar is needed at the fractional timestep {float(t)}")
            alpha_bar = schedule.alpha_bar(torch.tensor(int(t), device=x.device))
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x.device)
        if guided:
            ts = torch.full((2 * b,), float(t), device=x.device)
            out = apply(model, torch.cat([x, x]), ts, cat([context, uncond_context]))
            out = guide(out[:b], out[b:], cfg_scale, cfg_rescale)
        else:
            out = apply(model, x, torch.full((b,), float(t), device=x.device), context)
        return prediction.to_x0_eps(out.float(), x, alpha_bar)

    return denoiser
