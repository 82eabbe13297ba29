"""Where in the noise range a shapes model loses the caption's shape: rendered validation images
are noised to timestep t and denoised back (DDIM, CFG, 20 steps from t), then judged.

    python bench/denoise_from.py RUN/model.safetensors --t 400 600 700 800 999

From t = 999 (pure noise under zero terminal SNR) this is text-to-image; from a small t the
image's own geometry is still in x_t. The t at which shape type falls to chance (0.33) is where
the model would have to draw the shape from the text alone (bench/results/shape_type/).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ldm.checkpoints.load import load_model
from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import sample_ddim
from ldm.pipeline import to_uint8
from ldm.shapes.judge import score
from ldm.shapes.render import caption, render_sample, sample_rng


def validation_images(n: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 64, 64) in [-1, 1] and their captions: the rendered validation split's first n."""
    images, prompts = [], []
    for i in range(n):
        image, meta = render_sample(sample_rng(0, "val", i))
        images.append(np.asarray(image))
        prompts.append(caption(meta["shape_colour"], meta["shape"], meta["background"]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, prompts


@torch.no_grad()
def denoise_from(model, x: torch.Tensor, prompts: list[str], t0: int, cfg: float) -> dict:
    z0 = model.vae.encode(x, sample=False)
    ab = model.schedule.alphas_cumprod.float()
    generator = torch.Generator().manual_seed(t0)
    eps = torch.randn(z0.shape, generator=generator)
    zt = ab[t0].sqrt() * z0 + (1 - ab[t0]).sqrt() * eps  # q(x_t | x_0)
    denoiser = make_denoiser(
        model.unet, model.schedule, model.prediction, model.text_encoder(prompts),
        model.text_encoder([""] * len(prompts)), cfg_scale=cfg,
    )  # fmt: skip
    timesteps = [int(round(t)) for t in np.linspace(t0, 0, 20, endpoint=False)]
    z = sample_ddim(denoiser, zt, timesteps, ab, final_alpha_cumprod=ab[0])
    result = score(list(to_uint8(model.vae.decode(z)).numpy()), prompts)
    return {k: round(float(v), 3) for k, v in result.items() if k != "n"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("--t", type=int, nargs="+", default=[400, 600, 700, 800, 999])
    parser.add_argument("--n", type=int, default=96, help="validation images")
    parser.add_argument("--cfg", type=float, default=4.0)
    args = parser.parse_args(argv)
    model = load_model(args.weights)
    x, prompts = validation_images(args.n)
    for t0 in args.t:
        print(json.dumps({"t": t0, **denoise_from(model, x, prompts, t0, args.cfg)}), flush=True)


if __name__ == "__main__":
    main()
