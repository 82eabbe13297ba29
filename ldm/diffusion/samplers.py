"""Samplers as pure functions over a denoiser `denoiser(x_t, t, alpha_bar) -> (x0, eps)`.

The denoiser sees the variance-preserving latent x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
at network timestep t (a float: it may fall between training steps) and noise level alpha_bar,
and returns both estimates (see `guidance.make_denoiser`). Two kinds of sampler share it:

- alpha_bar space (DDPM, DDIM) carry x_t over integer training timesteps;
- sigma space (Euler, Euler ancestral, Heun, DPM-Solver++; k-diffusion style) carry
  x = x_t / sqrt(alpha_bar) = x0 + sigma eps over descending sigmas ending at 0, and call the
  denoiser through `denoise_at_sigma`.

Each is checked step by step against its diffusers scheduler (tests/diffusion). Randomness comes
from `generator`: one generator, or a list with one per batch row so that each image's noise
depends on its own seed only. `sample` runs any of them by name from unit Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ldm.diffusion.guidance import Denoiser
from ldm.diffusion.schedule import sampling_timesteps
from ldm.diffusion.sigmas import SIGMA_SPACINGS, dpm_solver_schedule, sigma_schedule

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like x (B, ...). With a list of generators, row i is drawn
    from generator i (as diffusers' `randn_tensor` does), on that generator's device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        noise = torch.cat(
            [
                torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype)
                for g in generator
            ]
        )
    else:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return noise.to(x.device)


def denoise_at_sigma(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) for x = x0 + sigma eps: the network sees x / sqrt(1 + sigma^2), at
    alpha_bar = 1 / (1 + sigma^2)."""
    return denoiser(x / (sigma**2 + 1) ** 0.5, t, 1 / (sigma**2 + 1))


# ---- alpha_bar space: x_t over integer timesteps ------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: list[int],
    alphas_cumprod: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (Ho et al., 2020, Eqs. 6-7),
    with its "fixed small" variance, between any two visited timesteps."""
    ab = alphas_cumprod.to(x.device, torch.float32)
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(ab_t)
        x0, _ = denoiser(x, t, ab_t)
        alpha = ab_t / ab_prev  # of the jump t -> prev
        beta = 1 - alpha
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + (
            alpha**0.5 * (1 - ab_prev) / (1 - ab_t)
        ) * x
        if t > 0:  # diffusers adds no noise only when landing past training step 0
            variance = ((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=1e-20)
            mean = mean + variance**0.5 * randn_like(x, generator)
        x = mean
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: list[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al., 2021, Eq. 12); eta=0 is deterministic, eta=1 matches DDPM's variance.

    The last step lands on alpha_bar = `final_alpha_cumprod`: 1 (x0 itself; diffusers'
    set_alpha_to_one=True) or alphas_cumprod[0] (Stable Diffusion's original sampler and every
    SD 1.x/2.x scheduler_config.json: set_alpha_to_one=False)."""
    ab = alphas_cumprod.to(x.device, torch.float32)
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32, device=x.device)
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else final
        x0, eps = denoiser(x, t, ab_t)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and sigma > 0:  # no noise when landing on alpha_bar = 1
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


# ---- sigma space: x = x0 + sigma eps over descending sigmas ending at 0 -------------------------
# With sigma as the ODE's time variable the probability-flow ODE is dx/dsigma = (x - x0) / sigma
# (= eps; Karras et al., 2022, Eq. 4 with sigma(t) = t). The slope is formed from x0 as
# k-diffusion and diffusers form it, so that float32 rounds alike where x is large (sigma_max is
# 4096 under zero terminal SNR).


def _slope(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - x0) / sigma


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al., 2022, Alg. 1 without the Heun
    correction)."""
    for i, t in enumerate(timesteps):
        x0, _ = denoise_at_sigma(denoiser, x, sigmas[i], t)
        x = x + (sigmas[i + 1] - sigmas[i]) * _slope(x, x0, sigmas[i])
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler down to sigma_down, then fresh noise up to sigma_next (k-diffusion's
    `get_ancestral_step`):
    the step's total variance matches the ancestral (DDPM) transition."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0, _ = denoise_at_sigma(denoiser, x, sigma, t)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (sigma_down - sigma) * _slope(x, x0, sigma)
        if sigma_next > 0:
            x = x + sigma_up * randn_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al., 2022, Alg. 1): two network calls per step, except
    the last, which lands on sigma = 0 where the trapezoid's second slope is undefined (Euler)."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0, _ = denoise_at_sigma(denoiser, x, sigma, t)
        dt, d = sigma_next - sigma, _slope(x, x0, sigma)
        if sigma_next == 0:
            x = x + dt * d
        else:
            x_euler = x + dt * d
            x0_next, _ = denoise_at_sigma(denoiser, x_euler, sigma_next, timesteps[i + 1])
            x = x + dt * (d + _slope(x_euler, x0_next, sigma_next)) / 2
        if callback is not None:
            callback(i, x, x0)
    return x


def _dpmpp_2m_steps(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    sde: bool,
    generator: Generators,
    callback: Callback | None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, Alg. 2), and its SDE variant (Sec. 5; diffusers'
    "sde-dpmsolver++", midpoint), in lambda = -log sigma. The first step is first order; the
    last lands on sigma = 0, where both reduce to x = x0."""
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0, _ = denoise_at_sigma(denoiser, x, sigma, t)
        if sigma_next == 0:
            x = x0
        else:
            h = sigma.log() - sigma_next.log()  # lambda_next - lambda
            # x0 extrapolated to the step's midpoint in lambda from the last two estimates
            d = x0 if x0_prev is None else x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
            if sde:
                x = (
                    (sigma_next / sigma * (-h).exp()) * x
                    - (-2 * h).expm1() * d
                    + sigma_next * (-(-2 * h).expm1()).sqrt() * randn_like(x, generator)
                )
            else:
                x = (sigma_next / sigma) * x - (-h).expm1() * d
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): a second-order multistep ODE solver, one network call per step."""
    return _dpmpp_2m_steps(denoiser, x, sigmas, timesteps, False, generator, callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the same multistep update on the reverse SDE, with fresh noise each
    step."""
    return _dpmpp_2m_steps(denoiser, x, sigmas, timesteps, True, generator, callback)


ALPHA_BAR_SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}
SIGMA_SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
SAMPLERS = {**ALPHA_BAR_SAMPLERS, **SIGMA_SAMPLERS}


def check_options(name: str, sigmas: str | None, eta: float) -> None:
    """Refuse a sampler name, or an option it does not take, with the choices there are."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if eta and name != "ddim":
        raise ValueError(f"eta={eta} applies to ddim only, not {name}")
    if sigmas is not None and sigmas not in SIGMA_SPACINGS:
        raise ValueError(
            f"unknown sigma spacing {sigmas!r}; choose {', '.join(SIGMA_SPACINGS)} or null"
        )
    if sigmas is not None and name not in SIGMA_SAMPLERS:
        raise ValueError(
            f"sigmas={sigmas!r} applies to the sigma-space samplers "
            f"({', '.join(SIGMA_SAMPLERS)}), not {name}"
        )


@dataclass
class SamplerConfig:
    """Which sampler, and how: `name` is a key of `ldm.diffusion.samplers.SAMPLERS`; `sigmas`
    (karras, exponential or None) respaces the noise levels of the sigma-space samplers; `eta`
    is DDIM's stochasticity. Neutral defaults: the measured recommendation (DPM-Solver++ 2M,
    20 steps, exponential sigmas) is `configs/sampler/dpmpp_2m.yaml`, sample.py's default.
    `steps_offset` (leading spacing only) and `set_alpha_to_one` (DDIM's last step) default to
    Stable Diffusion's scheduler_config.json values, which diffusers' pipelines use."""

    name: str = "dpmpp_2m"
    steps: int = 20
    cfg_scale: float = 4.0
    cfg_rescale: float = 0.0
    eta: float = 0.0
    spacing: str = "trailing"
    sigmas: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        check_options(self.name, self.sigmas, self.eta)


def sample(
    name: str,
    denoiser: Denoiser,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    spacing: str = SamplerConfig.spacing,
    sigmas: str | None = SamplerConfig.sigmas,
    eta: float = SamplerConfig.eta,
    steps_offset: int = SamplerConfig.steps_offset,
    set_alpha_to_one: bool = SamplerConfig.set_alpha_to_one,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Clean latents from unit Gaussian `noise` (B, ...) with the sampler called `name`.

    Sigma-space samplers start from noise * sqrt(1 + sigma_max^2): the same point x_T = noise
    that DDPM/DDIM (and diffusers' DPM-Solver) start from, seen in sigma space. (diffusers' Euler
    and Heun use sigma_max alone for trailing/linspace spacing, 0.2% smaller at SD's sigma_max.)
    `steps_offset` shifts `leading` timesteps (diffusers' scheduler option of that name);
    `set_alpha_to_one` picks DDIM's final alpha_bar (see `sample_ddim`). The options default to
    `SamplerConfig`'s (Stable Diffusion's scheduler values), so a direct call samples as a
    config does.
    """
    check_options(name, sigmas, eta)
    if name in ALPHA_BAR_SAMPLERS:
        ts = sampling_timesteps(len(alphas_cumprod), steps, spacing, steps_offset)
        final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
        extra = {"eta": eta, "final_alpha_cumprod": final} if name == "ddim" else {}
        return SAMPLERS[name](
            denoiser, noise, ts, alphas_cumprod, generator=generator, callback=callback, **extra
        )
    make_schedule = dpm_solver_schedule if name.startswith("dpmpp") else sigma_schedule
    sig, ts = make_schedule(alphas_cumprod, steps, spacing, sigmas, steps_offset)
    sig, ts = sig.to(noise.device), ts.to(noise.device)
    x = noise * (sig[0] ** 2 + 1) ** 0.5
    return SAMPLERS[name](denoiser, x, sig, ts, generator=generator, callback=callback)
