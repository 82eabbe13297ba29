"""train.py over 2 DDP processes (CPU, gloo) against 1 process at the same global batch, with
validation (one validation shard for 2 ranks x 2 workers) and every default callback on; a NaN
on one rank only. Each run has a time limit: a rank left waiting in a collective fails the test
instead of hanging the suite."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.runs import finish, overrides, per_batch, wandb_losses
from wandb_records import history


def val_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    head = lines[0].split(",")
    return [dict(zip(head, map(float, line.split(",")))) for line in lines[1:]]


@pytest.fixture(scope="module")
def one_and_two(alone_run, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The 1-process run (shared with the resume tests) and the same run on 2 ranks, in a
    folder of its own (to count what it writes), its EMA kept apart from DDP in host memory
    (an option that must not change the result)."""
    home = tmp_path_factory.mktemp("ddp")
    finish(overrides(home, ranks=2) + ["model.ema.device=cpu"], home / "two", home)
    return home, alone_run, home / "two"


def test_two_processes_write_one_run_directory_one_weights_file_one_wandb_run(one_and_two):
    home, _, two = one_and_two
    made = sorted(p.name for p in home.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert made == ["shards", "two"]  # (hidden ones: caches under HOME)
    assert [p.name for p in two.glob("*.safetensors")] == ["model.safetensors"]
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    assert not [p for p in two.rglob("*") if p.is_dir() and "rank" in p.name and p.name != "."]
    assert json.loads((two / "train_summary.json").read_text())["step"] == 16
    assert sorted(p.name for p in (two / "samples").glob("*.png")) == [
        "step_000000.png",
        "step_000008.png",
        "step_000016.png",
    ]


def test_two_processes_train_on_the_same_batches_with_the_same_losses_as_one(one_and_two):
    _, one, two = one_and_two
    alone, ranks = per_batch(one), [per_batch(two, r) for r in range(2)]
    for b, (keys, _) in alone.items():  # each global batch split between the ranks
        assert keys == ranks[0][b][0] + ranks[1][b][0]
    l1, l2 = wandb_losses(one), wandb_losses(two)  # train/loss: the mean over the ranks
    assert l1.keys() == l2.keys() and len(l1) == 16
    torch.testing.assert_close(torch.tensor(list(l2.values())), torch.tensor(list(l1.values())))
    for r1, r2 in zip(val_rows(one), val_rows(two), strict=True):  # validation on 1 shard
        assert r1.keys() == r2.keys() and r1["step"] == r2["step"]
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), k
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4  # reduction order: float rounding, not a different run


def test_a_nan_on_one_rank_is_skipped_by_both_and_the_run_finishes(tmp_path):
    args = overrides(tmp_path, ranks=2, steps=6) + [
        "+callbacks.nan._target_=tests.training.faults.NaNOnRank",
        "+callbacks.nan.rank=1",
        "+callbacks.nan.batch=3",
    ]
    finish(args, tmp_path / "run", tmp_path)
    for rank in range(2):  # every batch trained on both ranks, none hung
        rows = (tmp_path / "run/batch_keys" / f"rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(row)["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    # the step of batch 3 changed nothing: AdamW counted 5 updates of every parameter in 6 steps
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {5}
    logged = history(next((tmp_path / "run/wandb").glob("*/run-*.wandb")))
    assert [r["train/nonfinite_steps"] for r in logged if "train/nonfinite_steps" in r] == [1]


def test_a_hydra_sweep_over_ddp_runs_gives_one_directory_and_one_wandb_run_per_job(tmp_path):
    args = [a for a in overrides(tmp_path, ranks=2, steps=2) if a != "resume=auto"]
    sweep = tmp_path / "sweep"
    finish(
        ["-m", *args, "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"], tmp_path / "x", tmp_path
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert [p.name for p in (sweep / job).glob("*.safetensors")] == ["model.safetensors"]
        assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1
        assert json.loads((sweep / job / "train_summary.json").read_text())["step"] == 2
