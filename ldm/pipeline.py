"""Text -> image without Lightning: used by `sample.py` and by the sample-grid callback."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedule import NoiseSchedule, sampling_timesteps


@dataclass
class SamplerConfig:
    name: str = "ddim"
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_rescale: float = 0.0
    eta: float = 0.0
    spacing: str = "trailing"


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One latent per seed, each drawn from its own generator: an image depends on its seed only,
    not on the batch it was made in."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class Pipeline:
    """Prompts (+ negative prompts) and seeds -> images."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 schedule: NoiseSchedule, prediction: str) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.schedule, self.prediction = schedule, prediction

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
        negative = negative_prompts or [""] * len(prompts)
        context = self.text_encoder(list(prompts))
        uncond = self.text_encoder(list(negative)) if sampler.cfg_scale != 1.0 else None
        denoiser = make_denoiser(self.unet, self.schedule, self.prediction, context, uncond,
                                 sampler.cfg_scale, sampler.cfg_rescale)
        c = self.vae.post_quant_conv.in_channels  # latent channels
        x = initial_noise(seeds, (c, height // f, width // f), self.device)
        ts = sampling_timesteps(self.schedule.num_steps, sampler.steps, sampler.spacing)
        sample = SAMPLERS[sampler.name]
        latents = sample(denoiser, x, ts, self.schedule.alphas_cumprod, eta=sampler.eta,
                         generator=torch.Generator(self.device).manual_seed(int(seeds[0])))
        return to_uint8(self.vae.decode(latents))
