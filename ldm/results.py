"""Tabulate a Hydra sweep: `python -m ldm.results multirun/<date>/<time> [--metric NAME]`.

Reads each job directory's `.hydra/overrides.yaml` and `metrics.csv` (written by
`ldm.training.callbacks.MetricsCSV`), and writes into the sweep directory `results.md`,
`results.csv`
(one row per job: the swept values, the last validation metrics and their best over the run)
and `curves.png` (validation curves, one line per job). Jobs without metrics are skipped and
counted.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ldm.config import exit_on

DEFAULT_METRICS = (
    "val/loss_min_snr",
    "val/mse_x0",
    "val/mse_eps",
    "val/adherence_all",
    "val/adherence_background",
    "val/adherence_shape_colour",
    "val/adherence_shape",
)
LOWER_IS_BETTER_PREFIX = ("val/loss", "val/mse")


def swept_keys(sweep_dir: str | Path) -> list[str]:
    """Keys given with sweep syntax (`a=1,2`, `range(...)`) on the multirun's command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    # Unresolved: an override may hold an interpolation (`x=${root:}/...`) only train.py resolves.
    task = OmegaConf.to_container(OmegaConf.load(path))["hydra"]["overrides"]["task"]
    return [
        o.get_key_element()
        for o in OverridesParser.create().parse_overrides(task)
        if o.is_sweep_override()
    ]


def read_overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    return dict(item.split("=", 1) for item in items if "=" in item)


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = (d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir())
    return sorted(
        dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name)
    )


def collect(sweep_dirs: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """(jobs, override keys to show, skipped job names); a job is {name, overrides, history}.

    The keys are those swept in any of the directories, then any other that differs between
    jobs (e.g. a value fixed per sweep when several sweeps are tabulated together).
    """
    jobs, skipped = [], []
    for sweep_dir in sweep_dirs:
        for d in _job_dirs(sweep_dir):
            name = f"{sweep_dir.name}/{d.name}" if len(sweep_dirs) > 1 else d.name
            metrics = d / "metrics.csv"
            history = read_metrics(metrics) if metrics.is_file() else []
            if not history:
                skipped.append(name)
                continue
            jobs.append({"name": name, "overrides": read_overrides(d), "history": history})
    keys = list(dict.fromkeys(k for d in sweep_dirs for k in swept_keys(d)))
    all_keys = dict.fromkeys(k for j in jobs for k in j["overrides"])
    keys += [
        k for k in all_keys if k not in keys and len({job["overrides"].get(k) for job in jobs}) > 1
    ]
    return jobs, keys, skipped


def _best(values: list[float], metric: str) -> float:
    return min(values) if metric.startswith(LOWER_IS_BETTER_PREFIX) else max(values)


def table_rows(jobs: list[dict], keys: list[str], metrics: list[str]) -> list[dict]:
    rows = []
    for job in jobs:
        last = job["history"][-1]
        row = {
            "job": job["name"],
            **{k: job["overrides"].get(k, "") for k in keys},
            "step": int(last.get("step", 0)),
        }
        for m in metrics:
            values = [r[m] for r in job["history"] if m in r]
            row[m] = last.get(m, float("nan"))
            row[f"best {m}"] = _best(values, m) if values else float("nan")
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(jobs: list[dict], keys: list[str], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        for job in jobs:
            pts = [(r["step"], r[m]) for r in job["history"] if m in r]
            label = (
                ", ".join(f"{k.split('.')[-1]}={job['overrides'].get(k, '')}" for k in keys)
                or job["name"]
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_title(m), ax.set_xlabel("step"), ax.grid(alpha=0.3)
        if m.startswith(LOWER_IS_BETTER_PREFIX):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(
    sweep_dirs: str | Path | list,
    metrics: list[str] | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write results.md, results.csv and curves.png for one sweep directory (or several read as
    one sweep) into `out_dir` (default: the first directory); returns their paths."""
    sweep_dirs = [Path(d) for d in (sweep_dirs if isinstance(sweep_dirs, list) else [sweep_dirs])]
    for d in sweep_dirs:
        if not d.is_dir():
            raise ValueError(f"not a directory: {d}")
    jobs, keys, skipped = collect(sweep_dirs)
    if not jobs:
        raise ValueError(
            f"no job in {', '.join(map(str, sweep_dirs))} has a metrics.csv (is it a "
            "multirun directory, and did the runs reach a validation?)"
        )
    if skipped:
        print(
            f"skipped {len(skipped)} job(s) without metrics: {', '.join(skipped)}", file=sys.stderr
        )
    present = {k for j in jobs for r in j["history"] for k in r}
    metrics = [m for m in (metrics or DEFAULT_METRICS) if m in present]
    if not metrics:
        raise ValueError(f"none of the requested metrics were logged; found: {sorted(present)}")
    out = Path(out_dir) if out_dir else sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(jobs, keys, metrics)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "curves.png"}
    paths["md"].write_text(to_markdown(rows))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(jobs, keys, metrics, paths["png"])
    return paths


@exit_on(OSError, ValueError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Table and curves of a Hydra sweep directory.")
    parser.add_argument(
        "sweep_dirs",
        type=Path,
        nargs="+",
        help="e.g. multirun/2026-01-01/12-00-00 (several: tabulated together)",
    )
    parser.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        help=f"metric column (repeatable); default {', '.join(DEFAULT_METRICS)}",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the sweep dir)"
    )
    args = parser.parse_args(argv)
    paths = summarize(args.sweep_dirs, args.metrics, args.out)
    print(paths["md"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
