import time

import pytest

from ldm.training import loggers


def test_explicit_modes_are_kept(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert loggers.resolve_mode("offline") == ("offline", None)
    assert loggers.resolve_mode("disabled") == ("disabled", None)


def test_environment_mode_wins_over_auto(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert loggers.resolve_mode("auto") == ("offline", None)


@pytest.mark.parametrize(
    "logged_in,reachable,why", [(False, True, "wandb login"), (True, False, "cannot be reached")]
)
def test_auto_falls_back_to_offline(monkeypatch, logged_in, reachable, why):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "_has_api_key", lambda: logged_in)
    monkeypatch.setattr(loggers, "_reachable", lambda *a, **k: reachable)
    mode, reason = loggers.resolve_mode("auto")
    assert mode == "offline" and why in reason


def test_auto_is_online_when_logged_in_and_reachable(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "_has_api_key", lambda: True)
    monkeypatch.setattr(loggers, "_reachable", lambda *a, **k: True)
    assert loggers.resolve_mode("auto") == ("online", None)


def test_offline_logger_prints_one_line_with_the_sync_command(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers, "_has_api_key", lambda: False)
    with caplog.at_level("WARNING", logger="ldm.training.loggers"):
        logger = loggers.wandb_logger(project="t", save_dir=str(tmp_path))
    logger.experiment.finish()
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.training.loggers"]
    assert len(lines) == 1 and "W&B offline" in lines[0] and f"wandb sync {tmp_path}" in lines[0]


def test_a_resumed_run_must_exist_online_and_is_allowed_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    offline = loggers.wandb_logger(
        save_dir=str(tmp_path), mode="offline", id="abc123", resume="must"
    )
    assert offline._wandb_init["resume"] == "allow" and offline._wandb_init["id"] == "abc123"


def written_rows(root, pattern: str, last_step: int, timeout: float = 30.0) -> list[dict]:
    """The history rows of the offline run files matching `pattern`, once the row of
    `last_step` is on disk: W&B's service process writes them after `finish()` returns, which
    on a loaded machine (CI's test workers) can take a moment."""
    from wandb_records import history

    deadline = time.monotonic() + timeout
    while True:
        rows = [r for f in sorted(root.glob(pattern)) for r in history(f)]
        if any(r.get("trainer/global_step") == last_step for r in rows):
            return rows
        if time.monotonic() > deadline:
            return rows  # the assertions that follow say what is missing
        time.sleep(0.2)


def test_a_resumed_run_does_not_log_again_the_steps_it_trains_again(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = loggers.wandb_logger(project="t", save_dir=str(tmp_path), mode="offline", id="r1")
    for step in range(6):  # then killed; its checkpoint was at step 3
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/loss": 5.5}, step=5)  # a second row at the same step is kept
    first.experiment.finish()
    # W&B names an offline run's folder after its start second and id: a resume within the same
    # second as the first start would share its folder (a crashed run restarts later than that).
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    again = loggers.wandb_logger(
        project="t", save_dir=str(tmp_path), mode="offline", id="r1", resume="must"
    )
    for step in range(4, 9):
        again.log_metrics({"train/loss": 10.0 + step}, step=step)
    again.experiment.finish()
    rows = written_rows(tmp_path, "wandb/offline-run-*/run-*.wandb", last_step=8)
    losses = [(r["trainer/global_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert losses == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)] + [
        (6, 16.0),
        (7, 17.0),
        (8, 18.0),
    ]
    assert [r["val/loss"] for r in rows if "val/loss" in r] == [5.5]
    other = loggers.wandb_logger(project="t", save_dir=str(tmp_path), mode="offline", id="r2")
    other.log_metrics({"train/loss": 1.0}, step=0)  # another run in the same folder: its own
    other.experiment.finish()
    rows = written_rows(tmp_path, "wandb/offline-run-*-r2/run-*.wandb", last_step=0)
    assert [r["train/loss"] for r in rows if "train/loss" in r] == [1.0]


def test_online_the_resumed_runs_summary_says_which_steps_w_and_b_holds(tmp_path):
    class ResumedOnline:  # what wandb.init(resume="must") gives online, the server's summary
        id, resumed, offline = "r1", True, False
        summary = {"trainer/global_step": 7}

        def __init__(self):
            self.rows = []

        def log(self, row):
            self.rows.append(row)

    logger = loggers.StepOnceWandbLogger(project="t", save_dir=str(tmp_path), mode="offline")
    logger._experiment = run = ResumedOnline()
    for step in range(5, 10):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert [r["trainer/global_step"] for r in run.rows] == [8, 9]
    assert not (tmp_path / "wandb" / "r1.last_step").exists()  # online: no file of ours


def test_a_sweep_job_is_named_after_its_swept_values_or_else_its_number():
    overrides = ["optim.lr=1e-4", "trainer.max_steps=10", "seed=1"]
    assert loggers.sweep_job_name(overrides, {"optim.lr", "seed"}, 3) == "optim.lr=1e-4,seed=1"
    assert loggers.sweep_job_name(overrides, {"data.image_size"}, 3) == "3"
    assert loggers.sweep_job_name(["optim.lr=a=b"], {"optim.lr"}, 0) == "optim.lr=a=b"
