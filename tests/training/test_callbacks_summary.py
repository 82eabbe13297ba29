"""RunSummary: the run folder's train_summary.json, written by rank 0 when fit ends."""

import json
from types import SimpleNamespace

from lightning.pytorch.callbacks import Timer

from ldm.training.callbacks import RunSummary


def fake_trainer(callbacks, rank_zero=True):
    return SimpleNamespace(
        is_global_zero=rank_zero,
        callbacks=callbacks,
        global_step=12,
        precision="bf16-mixed",
        interrupted=False,
    )


def test_the_summary_holds_steps_minutes_precision_and_lightnings_training_minutes(tmp_path):
    timer = Timer()
    timer.load_state_dict({"time_elapsed": {"train": 90.0}})  # what a resumed run carries
    RunSummary(tmp_path / "train_summary.json").on_fit_end(fake_trainer([timer]), None)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert list(summary) == ["step", "minutes", "precision", "interrupted", "train_minutes"]
    assert summary["step"] == 12 and summary["precision"] == "bf16-mixed"
    assert summary["interrupted"] is False and summary["train_minutes"] == 1.5
    assert 0 <= summary["minutes"] < 1


def test_without_a_timer_the_training_minutes_are_null(tmp_path):
    RunSummary(tmp_path / "s.json").on_fit_end(fake_trainer([]), None)
    assert json.loads((tmp_path / "s.json").read_text())["train_minutes"] is None


def test_only_rank_zero_writes_it(tmp_path):
    RunSummary(tmp_path / "s.json").on_fit_end(fake_trainer([], rank_zero=False), None)
    assert not (tmp_path / "s.json").exists()
