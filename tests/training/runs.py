"""Tiny training runs as subprocesses, for the resume and distributed tests: start, watch,
kill, and read back what they trained on and logged."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env, tiny_overrides
from wandb_records import history

ROOT = Path(__file__).resolve().parents[2]


def overrides(tmp: Path, ranks: int = 1, steps: int = 16) -> list[str]:
    """The tests' tiny run (conftest.tiny_overrides) on a smaller rendered set: exact epochs of
    48 samples (3 global batches of 16 an epoch, so resumes land inside and at the end of
    epochs), 2 loader workers a rank, validation and sample callbacks on, a checkpoint every 2
    steps, float32; with `ranks` > 1, that many DDP processes on the CPU."""
    return [
        *tiny_overrides(tmp / "shards"),
        "data.prepare.n_train=48",
        "data.prepare.n_val=12",
        "data.prepare.shard_size=16",
        "+data.mode=exact",
        f"data.batch_size={16 // ranks}",
        "data.num_workers=2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "callbacks.sample_grid.every_n_steps=8",
        "+callbacks.batch_keys._target_=ldm.training.callbacks.BatchKeys",
        "resume=auto",
        # float32 on every CPU kind (auto is bf16-mixed where the CPU has bf16): the runs are
        # compared to float32 rounding; the precisions' own steps are tests/training/test_amp.py
        "trainer.precision=32-true",
        *(["trainer=cpu", f"trainer.devices={ranks}", "strategy=ddp"] if ranks > 1 else []),
    ]


def start(args: list[str], run_dir: Path, home: Path) -> subprocess.Popen:
    env = subprocess_env(home)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a kill reaches the workers and ranks
    )


def batches_done(run_dir: Path) -> int:
    path = run_dir / "batch_keys" / "rank0.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait(proc: subprocess.Popen, until, timeout: float = 300) -> bool:
    """Poll until `until()` (True) or the process ended (False)."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if until():
            return True
        if time.time() > deadline:
            kill(proc)
            pytest.fail("a run did not finish in time: hung")
        time.sleep(0.002)
    return False


def per_batch(run_dir: Path, rank: int = 0) -> dict[int, tuple[list[str], float]]:
    """batch number -> (keys, loss) of a rank, from the BatchKeys callback's file (flushed each
    line); a batch trained again after a resume must be the same batch with the same loss."""
    seen = {}
    for line in (run_dir / "batch_keys" / f"rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        entry = (row["keys"], row["loss"])
        assert seen.setdefault(row["batch"], entry) == entry
    return seen


def wandb_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss over every W&B run file of the run (one per attempt; a kill may lose
    the records W&B had not written yet)."""
    out = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for row in history(f):
            if "train/loss" in row:
                step, loss = row["trainer/global_step"], row["train/loss"]
                assert out.setdefault(step, loss) == loss
    return out


def logged_twice(run_dir: Path) -> list[tuple[str, int]]:
    """(metric, step) pairs found more than once over the run's W&B files (every attempt)."""
    seen, twice = set(), []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for row in history(f):
            step = row.get("trainer/global_step")
            for key in row:
                if key.startswith("_") or key in ("trainer/global_step", "epoch"):
                    continue  # W&B's own counters; Lightning adds the epoch to every row
                if (key, step) in seen:
                    twice.append((key, step))
                seen.add((key, step))
    return twice


def finish(args: list[str], run_dir: Path, home: Path, timeout: float = 240) -> None:
    """Run to the end; a run still going after `timeout` s fails the test (a hung rank)."""
    proc = start(args, run_dir, home)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"{run_dir.name}: still running after {timeout} s: a rank hangs")
    assert proc.returncode == 0, err.decode()[-3000:]
