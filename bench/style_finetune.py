"""Fine-tune the default shapes model on the pastel style and measure what it learned and kept.

    python bench/style_finetune.py BASE.safetensors --recipe shapes_lora [--recipe shapes_locon ...]
        [--out bench/results/style_finetune] [--n 4] [--seed 0] [--style-seed 0]
        [-- EXTRA TRAIN.PY OVERRIDES]

As a user would: the style set (200 pastel images, `ldm.shapes.pastel`) is rendered into a folder
and made into shards by `data/folder/prepare.py`; each recipe trains with
`train.py experiment=RECIPE init=BASE`; then `sample.py` (its defaults) makes the held-out
prompts (captions the style set does not hold) x `--n` seeds twice, with and without
", pastel style", from the base and from each fine-tune (with its LoRA file, embedding or
weights), and `ldm.shapes.pastel_judge` judges them. Written to OUT: results.json, results.md
(one row per model: training minutes, steps, file size, and on each prompt set the hue and
shape adherence and the pastel / plain fractions), and comparison_{pastel,plain}.png: a row
per model, the same prompts and seeds. `--style-seed` draws another style set (and so other
held-out prompts), `--seed` other sampling seeds: a recipe is judged on draws it was not tuned on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ldm.shapes.judge import _load_dir
from ldm.shapes.pastel import styled, write_style_folder
from ldm.shapes.pastel_judge import score_style
from ldm.shapes.render import caption_space

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, **kw) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, **kw)


def held_out_prompts(style_captions: list[str]) -> list[str]:
    """Plain captions of the caption space that the style set never shows (in its order)."""
    seen = {c.removesuffix(", pastel style") for c in style_captions}
    return [c for c in caption_space() if c not in seen]


def sample_and_score(
    model_args: list[str], prompts: list[str], out: Path, n: int, seed: int = 0
) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # sample.py adds to a folder: start it empty
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run(
        "sample.py",
        *model_args,
        f"prompt={out / 'prompts.txt'}",
        f"n={n}",
        f"seed={seed}",
        f"out_dir={out / 'images'}",
        "batch_size=64",
    )
    images, read_prompts, _ = _load_dir(out / "images")
    return score_style(images, read_prompts)


def train(recipe: str, base: Path, run_dir: Path, extra: list[str]) -> tuple[Path, float, int]:
    """(the file the run wrote, training minutes, steps)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's scratch: each call trains afresh
    run("train.py", f"experiment={recipe}", f"init={base}", f"hydra.run.dir={run_dir}", *extra)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    written = [p for p in run_dir.glob("*.safetensors")]
    return written[0], summary["train_minutes"] or summary["minutes"], summary["step"]


def model_args(base: Path, written: Path | None) -> list[str]:
    if written is None:
        return [f"ckpt={base}"]
    from ldm.checkpoints.files import read_metadata

    meta = read_metadata(written)
    if "ss_network_module" in meta:
        return [f"ckpt={base}", f"lora={written}"]
    if "ldm.token" in meta:
        return [f"ckpt={base}", f"embedding={written}"]
    return [f"ckpt={written}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="the default run's model.safetensors")
    ap.add_argument("--recipe", action="append", default=[], help="an experiment name")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/style_finetune")
    ap.add_argument("--n", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--style-images", type=int, default=200)
    ap.add_argument("--style-seed", type=int, default=0, help="draws the style set")
    ap.add_argument("--seed", type=int, default=0, help="sample.py's first seed")
    ap.add_argument("--redraw", action="store_true", help="only redraw OUT's comparison grids")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.redraw:
        redraw(args.out)
        return 0
    work = ROOT / "bench/runs/style"
    shutil.rmtree(work / "pastel", ignore_errors=True)
    captions = write_style_folder(work / "pastel", n=args.style_images, seed=args.style_seed)
    shutil.rmtree(work / "shards", ignore_errors=True)  # the folder is remade the same each run
    run("data/folder/prepare.py", str(work / "pastel"), str(work / "shards"), "--quiet")
    prompts = held_out_prompts(captions)
    results = {
        "held_out_prompts": len(prompts),
        "seeds": args.n,
        "first_seed": args.seed,
        "style_seed": args.style_seed,
        "base": _shown(args.base),
        "models": {},
    }
    for name in ["base", *args.recipe]:
        written, minutes, steps, seconds = None, 0.0, 0, 0.0
        if name != "base":
            start = time.perf_counter()
            written, minutes, steps = train(name, args.base, work / "runs" / name, extra)
            seconds = time.perf_counter() - start
        margs = model_args(args.base, written)
        row = {
            "train_minutes": minutes,
            "steps": steps,
            "wall_seconds": seconds,
            "file_mb": written.stat().st_size / 2**20 if written else None,
        }
        for label, ps in (("pastel", [styled(p) for p in prompts]), ("plain", prompts)):
            row[label] = sample_and_score(margs, ps, args.out / name / label, args.n, args.seed)
        results["models"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(table(results))
    for label in ("pastel", "plain"):
        comparison(args.out, list(results["models"]), label, args.n)
    return 0


def _shown(path: Path) -> str:
    """A path as results may record it: relative to the repository, else its file name only."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def redraw(out: Path) -> None:
    """The comparison grids of a finished OUT again (`--redraw`), from its results.json."""
    results = json.loads((out / "results.json").read_text())
    for label in ("pastel", "plain"):
        comparison(out, list(results["models"]), label, results["seeds"])


def comparison(out: Path, models: list[str], label: str, n: int, prompts: int = 12) -> None:
    """OUT/comparison_LABEL.png: a row per model, `prompts` prompts spread over the held-out
    set (their first seed), the same in every row."""
    import numpy as np
    import torch
    from PIL import Image

    from ldm.pipeline import image_grid

    total = len((out / models[0] / label / "prompts.txt").read_text().splitlines())
    picked = np.linspace(0, total - 1, prompts).round().astype(int)
    # sample.py names images by their seed's index, from the first seed on: sort, not guess.
    files = {
        m: sorted(p for p in (out / m / label / "images").glob("*.png") if p.stem.isdigit())
        for m in models
    }
    rows = [np.asarray(Image.open(files[m][i * n]).convert("RGB")) for m in models for i in picked]
    grid = image_grid(torch.from_numpy(np.stack(rows)), ncols=prompts)
    grid.save(out / f"comparison_{label}.png")


def table(results: dict) -> str:
    base = results["models"]["base"]
    lines = [
        "| model | minutes | steps | file MB | pastel prompts: both pastel | ... and both hues "
        "right | hue (bg / shape) | plain prompts: both plain | ... and both hues right "
        "| hue (bg / shape) | shape type (pastel / plain) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        p, q = r["pastel"], r["plain"]
        size = f"{r['file_mb']:.2f}" if r["file_mb"] else "-"
        lines.append(
            f"| {name} | {r['train_minutes']:.1f} | {r['steps']} | {size} | {p['pastel']:.2f} | "
            f"{p['style_and_colours']:.2f} | {p['background']:.2f} / {p['shape_colour']:.2f} | "
            f"{q['plain']:.2f} | {q['style_and_colours']:.2f} | "
            f"{q['background']:.2f} / {q['shape_colour']:.2f} | "
            f"{p['shape']:.2f} / {q['shape']:.2f} |"
        )
    lines.append(
        f"\nBase on plain prompts: background {base['plain']['background']:.2f}, "
        f"shape colour {base['plain']['shape_colour']:.2f}, both {base['plain']['colours']:.2f}; "
        f"{results['held_out_prompts']} held-out prompts (style set seed "
        f"{results['style_seed']}) x {results['seeds']} seeds from {results['first_seed']}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
