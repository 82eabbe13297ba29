"""MetricsCSV: the per-run validation record that `ldm.results` tabulates."""

import csv
from types import SimpleNamespace

import torch

from ldm.training.callbacks import MetricsCSV


def fake_trainer(tmp_path, step, metrics, sanity=False):
    return SimpleNamespace(
        sanity_checking=sanity,
        is_global_zero=True,
        global_step=step,
        default_root_dir=str(tmp_path),
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
    )


def test_metrics_csv_keeps_validation_metrics_and_widens_its_header(tmp_path):
    cb = MetricsCSV()
    cb.on_validation_end(fake_trainer(tmp_path, 0, {"val/loss": 9.0}, sanity=True), None)
    assert not (tmp_path / "metrics.csv").exists()  # Lightning's sanity check is not a result
    cb.on_validation_end(
        fake_trainer(tmp_path, 50, {"val/loss": 0.5, "perf/images_per_s": 3.0}), None
    )
    cb.on_validation_end(
        fake_trainer(
            tmp_path, 100, {"val/loss": 0.25, "val/adherence_all": 0.5, "train/loss": 0.3}
        ),
        None,
    )
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "val/loss", "train/loss", "val/adherence_all"]
    assert rows[0] == {"step": "50", "val/loss": "0.5", "train/loss": "", "val/adherence_all": ""}
    assert rows[1]["val/adherence_all"] == "0.5" and rows[1]["step"] == "100"
