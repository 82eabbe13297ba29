"""The denoising training objective: a weighted MSE at random timesteps, in the space of the
network's `Prediction` (eps, v or x0; see `prediction.py`)."""

from __future__ import annotations

import torch

from ldm.diffusion.conditioning import Condition, ModelFn, apply
from ldm.diffusion.prediction import Prediction, broadcast
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.weighting import get_weighting, snr_from_alpha_bar


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t of the forward process (Ho et al., 2020, Eq. 4)."""
    a = broadcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def sample_noise(
    x0: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise, plus a per-(sample, channel) constant when `offset_noise` > 0.

    The constant part lets the model change an image's mean colour, which plain noise at
    SD's schedule almost never asks of it (the "offset noise" trick).
    """
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise:
        b, c = x0.shape[:2]
        shift = torch.randn(
            (b, c) + (1,) * (x0.ndim - 2), generator=generator, device=x0.device, dtype=x0.dtype
        )
        eps = eps + offset_noise * shift
    return eps


def sample_timesteps(
    n: int,
    num_steps: int,
    kind: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training timesteps: uniform, or logit-normal (Esser et al., 2024, Sec. 3.1), which puts
    more of the batch at middle noise levels, where an image's layout is decided."""
    if kind == "uniform":
        return torch.randint(0, num_steps, (n,), generator=generator, device=device)
    if kind == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
        return (u * num_steps).long().clamp(max=num_steps - 1)
    raise ValueError(f"unknown timestep sampling {kind!r}; choose uniform or logit_normal")


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error over all but the batch dimension, in float32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class DiffusionObjective:
    """Weighted mean-squared error between the network output and its target at random timesteps.

    `weighting` names a function of `ldm.diffusion.weighting` (uniform: plain MSE; min_snr:
    Min-SNR-gamma with `min_snr_gamma`). `input_perturbation` > 0 builds x_t from
    eps + gamma * xi while the target keeps eps (Ning et al., 2023): the network sees at
    training time inputs as imperfect as its own predictions make them at sampling time.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str | Prediction = "eps",
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        input_perturbation: float = 0.0,
    ) -> None:
        prediction = Prediction.parse(prediction)
        sample_timesteps(1, schedule.num_steps, timestep_sampling)  # reject unknown kinds now
        prediction.check_schedule(float(schedule.alphas_cumprod[-1]))
        self.schedule, self.prediction, self.offset_noise = schedule, prediction, offset_noise
        self.timestep_sampling, self.logit_mean, self.logit_std = (
            timestep_sampling,
            logit_mean,
            logit_std,
        )
        self.weighting, self.weight_fn = weighting, get_weighting(weighting)
        self.min_snr_gamma, self.input_perturbation = min_snr_gamma, input_perturbation

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(t, eps, xi) for a batch of latents of `shape`: timesteps, noise and the input
        perturbation's noise (None without it), in this order from `generator`."""
        t = sample_timesteps(
            shape[0],
            self.schedule.num_steps,
            self.timestep_sampling,
            self.logit_mean,
            self.logit_std,
            generator,
            device,
        )
        eps = sample_noise(torch.empty(shape, device=device), self.offset_noise, generator)
        xi = None
        if self.input_perturbation:
            xi = torch.randn(shape, generator=generator, device=device)
        return t, eps, xi

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) weight of each sample's MSE at timesteps t."""
        return self.weight_fn(
            snr_from_alpha_bar(self.schedule.alpha_bar(t)), self.prediction, self.min_snr_gamma
        )

    def __call__(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        context: Condition,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sample_weight: torch.Tensor | None = None,
        xi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss for a batch of clean latents x0 (B, C, h, w) and their condition
        (`ldm.diffusion.conditioning`: the text context (B, L, D), or SDXL's dict with y).

        `t`, `eps` (and `xi`, the input perturbation's noise) may be given, e.g. from `draw`;
        otherwise they are drawn.
        `sample_weight` (B,) multiplies each sample's loss, e.g. a prior-preservation weight on
        class images.
        """
        if t is None:
            t = sample_timesteps(
                x0.shape[0],
                self.schedule.num_steps,
                self.timestep_sampling,
                self.logit_mean,
                self.logit_std,
                generator,
                x0.device,
            )
        if eps is None:
            eps = sample_noise(x0, self.offset_noise, generator)
        noise_in = eps
        if self.input_perturbation:
            if xi is None:
                xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
            noise_in = eps + self.input_perturbation * xi
        alpha_bar = self.schedule.alpha_bar(t)
        out = apply(model, q_sample(x0, noise_in, alpha_bar), t, context)
        target = self.prediction.target(x0, eps, alpha_bar)
        losses = self.loss_weight(t).to(out.device) * per_sample_mse(out, target)  # (B,)
        if sample_weight is not None:
            losses = losses * sample_weight.to(losses)
        return losses.mean()

    @torch.no_grad()
    def evaluate(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        context: Condition,
        t: torch.Tensor,
        eps: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Validation losses at fixed (t, eps), without input perturbation.

        `loss` is the training loss, in this run's own space and weighting: it cannot compare
        runs that differ in either. The others can: `mse_eps` and `mse_x0` are errors of the
        implied (x0, eps), and `loss_min_snr` is the Min-SNR-5 x0-space loss, which is the same
        number whichever space it is computed in and stays finite at both ends of the schedule
        (mse_x0 of an eps model grows like 1/SNR at high noise, mse_eps of x0/v models like SNR).
        """
        alpha_bar = self.schedule.alpha_bar(t)
        x_t = q_sample(x0, eps, alpha_bar)
        out = apply(model, x_t, t, context).float()
        own = per_sample_mse(out, self.prediction.target(x0, eps, alpha_bar))
        x0_hat, eps_hat = self.prediction.to_x0_eps(out, x_t, alpha_bar)
        min_snr5 = self.prediction.min_snr_weight(snr_from_alpha_bar(alpha_bar), 5.0)
        return {
            "loss": (self.loss_weight(t).to(own.device) * own).mean(),
            "mse_eps": per_sample_mse(eps_hat, eps).mean(),
            "mse_x0": per_sample_mse(x0_hat, x0).mean(),
            "loss_min_snr": (min_snr5.to(own.device) * own).mean(),
        }
