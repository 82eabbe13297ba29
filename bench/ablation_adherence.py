"""Shapes prompt adherence of trained models under two timestep spacings.

`python bench/ablation_adherence.py RUN_DIR [RUN_DIR ...] [--prompts 128] [--out results.csv]`

For each run directory's `model.safetensors`, samples a fixed prompt set (one fixed seed each,
DDIM 20 steps, guidance 4) with `trailing` spacing (the first step at t = T-1, where an eps
model on a zero-terminal-SNR schedule has no defined x0) and with `leading` spacing (first step
at t = 950 for 20 steps), and judges the images with `ldm.shapes.judge.score`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from ldm.checkpoints import load_model
from ldm.diffusion.samplers import SamplerConfig
from ldm.pipeline import Pipeline
from ldm.shapes.judge import score
from ldm.shapes.render import random_prompts

ROOT = Path(__file__).resolve().parents[1]

SPACINGS = ("trailing", "leading")


def adherence(run_dir: Path, prompts: list[str], spacing: str) -> dict[str, float]:
    model = load_model(run_dir / "model.safetensors", device=torch.device("cpu"))
    pipe = Pipeline(model.unet, model.vae, model.text_encoder, model.schedule, model.prediction)
    sampler = SamplerConfig(name="ddim", steps=20, cfg_scale=4.0, spacing=spacing)
    images = pipe(prompts, list(range(len(prompts))), sampler)
    # NaN latents decode to one flat colour: count the images that are not.
    non_flat = float(images.float().std(dim=(1, 2, 3)).gt(0).float().mean())
    return {
        "prediction": model.prediction,
        **score(list(images.numpy()), prompts),
        "non_flat": non_flat,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = random_prompts(args.prompts, 0)
    rows = []
    for run_dir in args.run_dirs:
        for spacing in SPACINGS:
            row = {"run": str(run_dir), "spacing": spacing, **adherence(run_dir, prompts, spacing)}
            rows.append(row)
            print(
                ", ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
