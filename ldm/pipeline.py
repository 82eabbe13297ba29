"""Text -> image without Lightning (used by `sample.py` and the training callbacks), and grids."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ldm.checkpoints import CheckpointError, load_model
from ldm.checkpoints.embeddings import check_words, read_embedding
from ldm.checkpoints.lora import read_loras
from ldm.checkpoints.lora_networks import merge_loras
from ldm.diffusion import conditioning
from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import SamplerConfig, sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.precision import Precision, autocast, resolve

log = logging.getLogger(__name__)


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: it draws that image's starting noise and then every noise the
    sampler adds to it, so an image depends on its seed only, not on its batch or device."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """(B, *shape) unit Gaussian latents, row i from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return (
        ((images.float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
    )


def image_grid(images: torch.Tensor, ncols: int | None = None) -> Image.Image:
    """(B, H, W, 3) uint8 -> one PIL image, row-major, with a 2-pixel gutter."""
    b, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = Image.new("RGB", (ncols * (w + 2) + 2, nrows * (h + 2) + 2), (255, 255, 255))
    for i, img in enumerate(images.numpy()):
        grid.paste(Image.fromarray(img), (2 + (i % ncols) * (w + 2), 2 + (i // ncols) * (h + 2)))
    return grid


class Pipeline:
    """Prompts (+ negative prompts) and seeds -> images, under autocast to `precision` if given
    (else in the caller's context: the training callbacks use the trainer's)."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        schedule: NoiseSchedule,
        prediction: str,
        precision: Precision | None = None,
    ) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.schedule, self.prediction, self.precision = schedule, prediction, precision

    @classmethod
    def load(
        cls,
        ckpt: str,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        loras: list[tuple[str, float]] = (),
        embeddings: list[str] = (),
        **options,
    ) -> tuple[Pipeline, dict]:
        """Our file, an SD 1.x/2.x single file (.safetensors or .ckpt) or a diffusers folder, as
        a Pipeline in `ldm.precision.resolve(precision, device, sampling=True)` (float32 on a
        CPU unless asked otherwise), and its model config.
        `loras` (file, scale) are merged into its weights; `embeddings` (textual-inversion files)
        add their words to its text encoder. `options` go to
        `ldm.checkpoints.load_model` (prediction, use_ema, vae, text_encoder). Half-precision
        files are held in float32 on the CPU (bf16 autocast, when asked for, does the fast
        maths)."""
        device = torch.device(device)
        chosen = resolve(precision, device, sampling=True)
        log.info("precision: %s (%s)", chosen.value, chosen.reason)
        dtype = torch.float32 if device.type == "cpu" else None
        # the small files first: a bad one is refused before the long load of the model
        adapters = read_loras(list(loras))
        words = [(Path(p).name, *read_embedding(p)) for p in embeddings]
        check_words([(name, word) for name, _, word in words])
        model = load_model(ckpt, device=device, dtype=dtype, **options)
        merge_loras(model, adapters)
        for name, vectors, word in words:
            try:
                model.text_encoder.add_embedding(word, vectors.to(device))
            except ValueError as e:  # a vocabulary word, another width: say which file
                raise CheckpointError(f"{name}: {e}") from None
        pipe = cls(
            model.unet, model.vae, model.text_encoder, model.schedule, model.prediction, chosen
        )
        return pipe, model.config

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device) if self.precision else contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """Images (B, H, W, 3) uint8 of `latents(prompts, seeds, sampler, negative_prompts,
        height, width)`."""
        latents = self.latents(*args, **kwargs)
        with self.autocast():
            return to_uint8(self.vae.decode(latents))

    @torch.no_grad()
    def latents(
        self,
        prompts: list[str],
        seeds: list[int],
        sampler: SamplerConfig,
        negative_prompts: list[str] | None = None,
        height: int = 64,
        width: int = 64,
        crop: tuple[int, int] = (0, 0),
        original_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The sampled latents (B, C, height / f, width / f), in the diffusion model's space.
        `crop` (top, left) and `original_size` (height, width; default: the image's) are SDXL's
        micro-conditioning, ignored by SD 1/2 models."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        f = self.vae.downsample_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the VAE factor {f}")
        negative = negative_prompts or [""] * len(prompts)
        time_ids = torch.tensor([[*(original_size or (height, width)), *crop, height, width]])
        time_ids = time_ids.float().expand(len(prompts), -1)
        with self.autocast():
            enc = self.text_encoder
            context = conditioning.to(enc.condition(list(prompts), time_ids), self.device)
            uncond = None
            if sampler.cfg_scale != 1.0:  # an empty negative prompt is SDXL's zeros
                drop = [n == "" for n in negative]
                uncond = enc.condition(list(negative), time_ids, drop=drop)
                uncond = conditioning.to(uncond, self.device)
            denoiser = make_denoiser(
                self.unet,
                self.schedule,
                self.prediction,
                context,
                uncond,
                sampler.cfg_scale,
                sampler.cfg_rescale,
            )
            c = self.vae.post_quant_conv.in_channels  # latent channels
            generators = seed_generators(seeds)
            noise = initial_noise(generators, (c, height // f, width // f), self.device)
            return sample(
                sampler.name,
                denoiser,
                noise,
                self.schedule.alphas_cumprod,
                sampler.steps,
                spacing=sampler.spacing,
                sigmas=sampler.sigmas,
                eta=sampler.eta,
                steps_offset=sampler.steps_offset,
                set_alpha_to_one=sampler.set_alpha_to_one,
                generator=generators,
            )


def is_file(value: str) -> bool:
    """Whether `value` names an existing file; False, never an error, for any string (one too
    long for a file name, or holding a NUL byte, is simply not a file)."""
    try:
        return os.path.isfile(value)
    except (OSError, ValueError):
        return False


def looks_like_file_name(value: str) -> bool:
    """A `.txt` name without whitespace: meant as a prompt file (so a typo is reported rather
    than drawn as a prompt); prompts have spaces."""
    return value.endswith(".txt") and not any(c.isspace() for c in value)


def read_prompts(prompt: str | list[str]) -> list[str]:
    """The prompts of a `prompt=` value: a list as it is; a text file's lines (one prompt each,
    blank lines skipped) when it names an existing file; else the value itself. A `.txt` name
    without whitespace that names no file is an error (a mistyped file, not a prompt)."""
    if not isinstance(prompt, str):
        return [str(p) for p in prompt]
    if not is_file(prompt):
        if looks_like_file_name(prompt):
            raise FileNotFoundError(
                f'prompt file {prompt!r} does not exist; pass prompt="some text" '
                f"or prompt=FILE with one prompt per line"
            )
        return [prompt]
    try:
        text = Path(prompt).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"prompt file {prompt!r} is not UTF-8 text; pass a text file with one prompt "
            f'per line, or prompt="some text"'
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {prompt!r} holds no prompt")
    return prompts
