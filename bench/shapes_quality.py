"""Prompt adherence of a shapes run against its training minutes.

For each checkpoint of a run (Lightning checkpoints written every few minutes, plus the final
`model.safetensors`), export the weights as train.py does, make 64 prompts x 4 seeds with
`sample.py`, judge them with the shapes evaluator, and write a CSV, a markdown table and a PNG
curve. Usage:

    python train.py +callbacks.checkpoint.train_time_interval._target_=datetime.timedelta \
        +callbacks.checkpoint.train_time_interval.minutes=2 callbacks.checkpoint.every_n_train_steps=null \
        callbacks.checkpoint.save_top_k=-1 hydra.run.dir=bench/runs/shapes
    python bench/shapes_quality.py bench/runs/shapes --out bench/results/shapes_quality
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm import checkpoint  # noqa: E402
from ldm.data.shapes import random_prompts  # noqa: E402
from train import export_metadata  # noqa: E402  (registers the config resolvers too)


def export_ckpt(run: Path, ckpt: Path, dst: Path) -> Path:
    """A Lightning checkpoint of a LatentDiffusion run -> the safetensors file train.py writes."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    module = instantiate(cfg.model)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return checkpoint.save(dst, module.export_parts(), export_metadata(cfg))


def evaluate(weights: Path, prompts: Path, out: Path, n: int, steps: int) -> dict:
    subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={weights}", f"prompt={prompts}",
                    f"n={n}", "seed=0", f"sampler.steps={steps}", f"out_dir={out}", "batch_size=64"],
                   check=True)
    subprocess.run([sys.executable, "-m", "ldm.evaluation.shapes", str(out), "--json",
                    str(out / "scores.json")], check=True, cwd=ROOT)
    return json.loads((out / "scores.json").read_text())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("background", "background colour"), ("shape_colour", "shape colour"),
                       ("shape", "shape type")):
        ax.plot([r["minutes"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set(xlabel="LDM training minutes (2-core CPU)", ylabel="accuracy (evaluator)", ylim=(0, 1.02),
           title="shapes: prompt adherence, 64 prompts x 4 seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a train.py run directory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shapes_quality")
    ap.add_argument("--minutes-per-ckpt", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(random_prompts(64, seed=1234)) + "\n")
    ckpts = sorted((args.run / "checkpoints").glob("epoch=*-step=*.ckpt"),
                   key=lambda p: int(p.stem.split("step=")[1]))
    points = [(args.minutes_per_ckpt * (i + 1), int(c.stem.split("step=")[1]), c) for i, c in enumerate(ckpts)]
    rows = []
    for minutes, step, ckpt in points:
        weights = export_ckpt(args.run, ckpt, args.out / "weights" / f"step_{step:06d}.safetensors")
        scores = evaluate(weights, prompts, args.out / "images" / f"step_{step:06d}", args.n, args.steps)
        rows.append({"minutes": minutes, "step": step, **scores})
    final = args.run / "model.safetensors"
    if final.is_file():
        meta = json.loads((args.run / "train_summary.json").read_text()) if (args.run / "train_summary.json").is_file() else {}
        scores = evaluate(final, prompts, args.out / "images" / "final", args.n, args.steps)
        rows.append({"minutes": meta.get("minutes", float("nan")), "step": meta.get("step", -1), **scores, "final": True})
    with open(args.out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["minutes", "step", "background", "shape_colour", "shape", "all", "n"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = ["| minutes | step | background | shape colour | shape type | all three |", "|---|---|---|---|---|---|"]
    table += [f"| {r['minutes']:.1f} | {r['step']} | {r['background']:.3f} | {r['shape_colour']:.3f} | "
              f"{r['shape']:.3f} | {r['all']:.3f} |" for r in rows]
    (args.out / "curve.md").write_text("\n".join(table) + "\n")
    plot([r for r in rows if r["minutes"] == r["minutes"]], args.out / "curve.png")
    print("\n".join(table))


if __name__ == "__main__":
    main()
