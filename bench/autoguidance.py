"""Shapes adherence with autoguidance (Karras et al., 2024): the U-Net's prediction extrapolated
away from a weaker model's (an earlier checkpoint of the same run, exported), then optionally
classifier-free guided, sampled as sample.py does (DPM-Solver++ 2M, 20 steps, exponential
sigmas, seed + i * n + j) and judged.

    python bench/autoguidance.py RUN/model.safetensors RUN/w_500.safetensors --w 2.5 --cfg 1

w = 1 is plain sampling, the same images as sample.py's (bench/results/shape_type/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ldm.checkpoints.load import load_model
from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import sample
from ldm.pipeline import initial_noise, read_prompts, seed_generators, to_uint8
from ldm.shapes.judge import score

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def images(main, weak, prompts: list[str], w: float, cfg: float, batch: int = 32) -> torch.Tensor:
    def model(x, t, c):  # D_weak + w (D_main - D_weak), in the network's own output space
        out = main.unet(x, t, c)
        if w == 1:
            return out
        guide = weak.unet(x, t, c)
        return guide + w * (out - guide)

    side = 64 // main.vae.downsample_factor  # the shapes set's 64 px
    out = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i : i + batch]
        denoiser = make_denoiser(
            model, main.schedule, main.prediction, main.text_encoder(rows),
            main.text_encoder([""] * len(rows)), cfg_scale=cfg,
        )  # fmt: skip
        noise = initial_noise(
            seed_generators(list(range(i, i + len(rows)))), (4, side, side), "cpu"
        )
        z = sample(
            "dpmpp_2m", denoiser, noise, main.schedule.alphas_cumprod, 20, sigmas="exponential"
        )
        out.append(to_uint8(main.vae.decode(z)))
    return torch.cat(out)  # (B, H, W, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("weak", help="the guiding model: an earlier checkpoint, exported")
    parser.add_argument("--w", type=float, default=2.5)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--prompts", default=str(ROOT / "bench/results/shapes_quality/prompts.txt"))
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    args = parser.parse_args(argv)
    main_model, weak = load_model(args.weights), load_model(args.weak)
    prompts = [p for p in read_prompts(args.prompts) for _ in range(args.n)]
    result = score(list(images(main_model, weak, prompts, args.w, args.cfg).numpy()), prompts)
    print(json.dumps({"w": args.w, "cfg": args.cfg, **{k: float(v) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
