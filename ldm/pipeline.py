"""Text -> image without Lightning: used by `sample.py` and by the sample-grid callback."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ldm.precision import Precision, autocast
from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS, sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigmas import SIGMA_SPACINGS


@dataclass
class SamplerConfig:
    """Which sampler, and how: `name` is a key of `ldm.diffusion.samplers.SAMPLERS`; `sigmas`
    (karras, exponential or None) respaces the noise levels of the sigma-space samplers; `eta`
    is DDIM's stochasticity. Neutral defaults: the measured recommendation (DPM-Solver++ 2M,
    20 steps, exponential sigmas) is `configs/sampler/dpmpp_2m.yaml`, sample.py's default."""
    name: str = "dpmpp_2m"
    steps: int = 20
    cfg_scale: float = 4.0
    cfg_rescale: float = 0.0
    eta: float = 0.0
    spacing: str = "trailing"
    sigmas: str | None = None

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if self.sigmas is not None and (self.sigmas not in SIGMA_SPACINGS or self.name not in SIGMA_SAMPLERS):
            raise ValueError(f"sigmas={self.sigmas!r} is not available for {self.name}: choose one of "
                             f"{SIGMA_SPACINGS} with {', '.join(SIGMA_SAMPLERS)}, or null")
        if self.eta and self.name != "ddim":
            raise ValueError(f"eta={self.eta} applies to ddim only, not {self.name}")


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: it draws that image's starting noise and then every noise the
    sampler adds to it, so an image depends on its seed only, not on its batch or device."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    """(B, *shape) unit Gaussian latents, row i from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class Pipeline:
    """Prompts (+ negative prompts) and seeds -> images, under autocast to `precision` if given
    (else in the caller's context: the training callbacks use the trainer's)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 schedule: NoiseSchedule, prediction: str,
                 precision: Precision | None = None) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.schedule, self.prediction, self.precision = schedule, prediction, precision

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], sampler: SamplerConfig,
                 negative_prompts: list[str] | None = None, height: int = 64,
                 width: int = 64) -> torch.Tensor:
        """Images as (B, H, W, 3) uint8."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        f = self.vae.downsample_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the VAE factor {f}")
        with autocast(self.precision, self.device) if self.precision else contextlib.nullcontext():
            return self.generate(prompts, seeds, sampler, negative_prompts, height // f, width // f)

    def generate(self, prompts: list[str], seeds: list[int], sampler: SamplerConfig,
                 negative_prompts: list[str] | None, h: int, w: int) -> torch.Tensor:
        """Images (B, H, W, 3) uint8 from latents of h x w."""
        negative = negative_prompts or [""] * len(prompts)
        context = self.text_encoder(list(prompts))
        uncond = self.text_encoder(list(negative)) if sampler.cfg_scale != 1.0 else None
        denoiser = make_denoiser(self.unet, self.schedule, self.prediction, context, uncond,
                                 sampler.cfg_scale, sampler.cfg_rescale)
        c = self.vae.post_quant_conv.in_channels  # latent channels
        generators = seed_generators(seeds)
        noise = initial_noise(generators, (c, h, w), self.device)
        latents = sample(sampler.name, denoiser, noise, self.schedule.alphas_cumprod, sampler.steps,
                         spacing=sampler.spacing, sigmas=sampler.sigmas, eta=sampler.eta,
                         generator=generators)
        return to_uint8(self.vae.decode(latents))
