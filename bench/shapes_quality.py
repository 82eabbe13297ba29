"""Prompt adherence of a shapes run against its training minutes.

For each Lightning checkpoint of a run (written every few minutes; a run resumed with
`resume=` continues the curve), export the weights as train.py does, make 64 prompts x 4 seeds with
`sample.py`, judge them with the shapes evaluator, and write a CSV, a markdown table and a PNG
curve. Usage:

    python train.py +callbacks.checkpoint.train_time_interval._target_=datetime.timedelta \
        +callbacks.checkpoint.train_time_interval.minutes=2 \
        callbacks.checkpoint.every_n_train_steps=null \
        callbacks.checkpoint.keep=-1 hydra.run.dir=bench/runs/shapes
    python bench/shapes_quality.py bench/runs/shapes [bench/runs/shapes_resumed ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.checkpoints.export import run_metadata
from ldm.checkpoints.layout import save
from ldm.config import register_resolvers
from ldm.shapes.render import random_prompts

ROOT = Path(__file__).resolve().parent.parent

register_resolvers()  # the run's config names ${root:}


def export_ckpt(run: Path, ckpt: dict, dst: Path) -> Path:
    """A Lightning checkpoint of a LatentDiffusion run -> the safetensors file train.py writes."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    L.seed_everything(cfg.seed, verbose=False)  # as train.py builds it: frozen random parts too
    module = instantiate(cfg.model)
    module.on_load_checkpoint(ckpt)  # a checkpoint holds what trains; checks the rest
    module.load_state_dict(ckpt["state_dict"])
    return save(dst, module.export_parts(), run_metadata(cfg, module.objective))


def training_minutes(ckpt: dict) -> float:
    """Training time recorded by Lightning's Timer (set by trainer.max_time), in minutes."""
    return ckpt["callbacks"]["Timer"]["time_elapsed"]["train"] / 60


def checkpoints(runs: list[Path]) -> list[tuple[float, int, Path, Path]]:
    """(minutes, step, run, file) of every checkpoint of the runs, one per step, in order."""
    found = {}
    for run in runs:
        for path in sorted((run / "checkpoints").glob("*.ckpt")):
            # mmap: only the step and timer are read here, not the 200 MB of tensors
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.setdefault(
                ckpt["global_step"], (training_minutes(ckpt), ckpt["global_step"], run, path)
            )
    return [found[step] for step in sorted(found)]


def evaluate(weights: Path, prompts: Path, out: Path, n: int, steps: int, sampler: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"ckpt={weights}",
            f"prompt={prompts}",
            f"n={n}",
            "seed=0",
            f"sampler={sampler}",
            f"steps={steps}",
            "cfg_scale=4",
            f"out_dir={out}",
            "batch_size=64",
        ],
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm.shapes.judge",
            str(out),
            "--json",
            str(out / "scores.json"),
        ],
        check=True,
        cwd=ROOT,
    )
    return json.loads((out / "scores.json").read_text())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("background", "background colour"),
        ("shape_colour", "shape colour"),
        ("shape", "shape type"),
    ):
        ax.plot([r["minutes"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set(
        xlabel="LDM training minutes (2-core CPU)",
        ylabel="accuracy (evaluator)",
        ylim=(0, 1.02),
        title="shapes: prompt adherence, 64 prompts x 4 seeds",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "runs", type=Path, nargs="+", help="train.py run directories (a run and its resumptions)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shapes_quality")
    ap.add_argument("--n", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--sampler",
        default="dpmpp_2m",
        help="sample.py's default (the curve of "
        "bench/results/shapes_quality used ddim with --steps 50)",
    )
    ap.add_argument(
        "--only", type=int, nargs="*", help="evaluate only the checkpoints of these steps"
    )
    ap.add_argument(
        "--final",
        nargs="*",
        default=[],
        metavar="RUN:MINUTES",
        help="also a run's model.safetensors, at its training minutes (a run stopped by "
        "trainer.max_time ends there; train_summary.json records it as train_minutes)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(random_prompts(64, seed=1234)) + "\n")
    rows = []
    for minutes, step, run, path in checkpoints(args.runs):
        if args.only and step not in args.only:
            continue
        images = args.out / "images" / f"step_{step:06d}"
        if (images / "scores.json").is_file():  # done by an earlier, interrupted invocation
            scores = json.loads((images / "scores.json").read_text())
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            weights = export_ckpt(run, ckpt, args.out / "weights" / f"step_{step:06d}.safetensors")
            scores = evaluate(weights, prompts, images, args.n, args.steps, args.sampler)
            weights.unlink()  # large, and reproducible from the checkpoint
        rows.append({"minutes": round(minutes, 2), "step": step, **scores})
        print(rows[-1], flush=True)
    for item in args.final:
        run, minutes = item.rsplit(":", 1)
        step = json.loads((Path(run) / "train_summary.json").read_text())["step"]
        scores = evaluate(
            Path(run) / "model.safetensors",
            prompts,
            args.out / "images" / f"final_{step:06d}",
            args.n,
            args.steps,
            args.sampler,
        )
        rows.append({"minutes": float(minutes), "step": step, **scores})
    rows.sort(key=lambda r: r["step"])
    with open(args.out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["minutes", "step", "background", "shape_colour", "shape", "all", "n"]
        )
        writer.writeheader()
        writer.writerows(rows)
    table = [
        "| training minutes | step | background | shape colour | shape type | all three |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['minutes']:.1f} | {r['step']} | {r['background']:.3f} | {r['shape_colour']:.3f} | "
        f"{r['shape']:.3f} | {r['all']:.3f} |"
        for r in rows
    ]
    (args.out / "curve.md").write_text("\n".join(table) + "\n")
    plot(rows, args.out / "curve.png")
    print("\n".join(table))


if __name__ == "__main__":
    main()
