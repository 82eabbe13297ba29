"""Noise levels for the sigma-space samplers, computed the way diffusers' schedulers compute them.

A discrete schedule with alpha_bar_t has sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the
noise level of x = x_t / sqrt(alpha_bar_t) = x0 + sigma eps (Karras et al., 2022, Sec. 2). A
sampler visits descending sigmas that end at 0, and evaluates the network at the training
timestep of each; with Karras or exponential spacing that timestep falls between training steps
(a fractional t, interpolated in log sigma as k-diffusion and diffusers do).

Two families of spacing exist because diffusers has two: `sigma_schedule` is that of its Euler,
Euler-ancestral and Heun schedulers, `dpm_solver_schedule` that of DPMSolverMultistepScheduler.
"""

from __future__ import annotations

import math

import torch

from ldm.diffusion.schedule import sampling_timesteps

SIGMA_SPACINGS = ("karras", "exponential")
# diffusers' stand-in for the alpha_bar = 0 of a zero-terminal-SNR schedule: keeps sigma_max
# finite (4096) so that sigma-space samplers can start there.
MIN_ALPHA_BAR = 2.0**-24


def discrete_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t of every training step, (T,) float32."""
    ab = alphas_cumprod.float().cpu().clamp(min=MIN_ALPHA_BAR)
    return ((1 - ab) / ab) ** 0.5


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma: log sigma interpolated linearly between the two
    neighbouring training steps, clamped to [0, T-1] (diffusers' `_sigma_to_t`)."""
    log_sigma = sigma.double().clamp(min=1e-10).log()  # (n,)
    log_sigmas = log_sigmas.double()  # (T,)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low = (dists >= 0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)  # last step below sigma
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return (1 - w) * low + w * high


def interp_sigmas(timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sigma at fractional timesteps, linear in sigma between training steps (numpy.interp)."""
    ts = timesteps.double()
    low = ts.floor().long().clamp(0, len(sigmas) - 2)
    s = sigmas.double()
    return s[low] + (ts - low) * (s[low + 1] - s[low])


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n sigmas evenly spaced in sigma^(1/rho) (Karras et al., 2022, Eq. 5), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n sigmas evenly spaced in log sigma, float64."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def _respace(kind: str | None, sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if kind == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    raise ValueError(f"unknown sigma spacing {kind!r}; choose karras, exponential or null")


def _with_final_zero(
    sigmas: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(
        [sigmas.double(), sigmas.new_zeros(1, dtype=torch.float64)]
    ).float(), timesteps.float()


def sigma_schedule(
    alphas_cumprod: torch.Tensor,
    steps: int,
    spacing: str = "trailing",
    sigmas: str | None = None,
    steps_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (steps+1,) ending in 0, timesteps (steps,)) as diffusers' Euler/Heun schedulers
    build them, both float32 on the CPU.

    `linspace` spacing puts the timesteps at fractional points; Karras/exponential sigmas span the
    sigmas of the spaced timesteps and are mapped back to fractional timesteps.
    """
    T = len(alphas_cumprod)
    if spacing == "linspace":  # fractional, unlike the DDIM/DDPM linspace
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).float().flip(0).double()
    else:
        ts = torch.tensor(sampling_timesteps(T, steps, spacing, steps_offset), dtype=torch.float64)
    table = discrete_sigmas(alphas_cumprod)
    sig = interp_sigmas(ts, table)
    if sigmas is not None:
        sig = _respace(sigmas, sig[-1].item(), sig[0].item(), steps)
        ts = sigma_to_t(sig, table.log())
    return _with_final_zero(sig, ts)


def dpm_solver_timesteps(
    num_train_steps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0
) -> list[int]:
    """DPMSolverMultistepScheduler's own spacings: `linspace` and `leading` split the range into
    steps+1 parts and drop the last point (t=0) instead of landing on it."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {steps}")
    if spacing == "linspace":
        ts = torch.linspace(0, num_train_steps - 1, steps + 1, dtype=torch.float64).round().long()
        return ts.flip(0)[:-1].tolist()
    if spacing == "leading":
        ratio = num_train_steps // (steps + 1)
        return [i * ratio + steps_offset for i in range(steps, 0, -1)]
    return sampling_timesteps(num_train_steps, steps, spacing, steps_offset)


def dpm_solver_schedule(
    alphas_cumprod: torch.Tensor,
    steps: int,
    spacing: str = "trailing",
    sigmas: str | None = None,
    steps_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (steps+1,) ending in 0, timesteps (steps,)) as DPMSolverMultistepScheduler builds
    them: integer timesteps always (Karras rounds, exponential truncates, as diffusers does), and
    Karras/exponential sigmas span the whole training range."""
    T = len(alphas_cumprod)
    table = discrete_sigmas(alphas_cumprod)
    if sigmas is None:
        ts = torch.tensor(
            dpm_solver_timesteps(T, steps, spacing, steps_offset), dtype=torch.float64
        )
        return _with_final_zero(interp_sigmas(ts, table), ts)
    sig = _respace(sigmas, table[0].item(), table[-1].item(), steps)
    ts = sigma_to_t(sig, table.log())
    # diffusers stores these timesteps as int64: Karras rounds first, exponential is truncated.
    ts = ts.round() if sigmas == "karras" else ts.floor()
    return _with_final_zero(sig, ts)
