"""Runs killed with SIGKILL and resumed with `resume=auto` (Lightning's own checkpointing with our
atomic writer and stateful loader) against the run left alone: the same samples per step, the
same losses and final weights, bit for bit; a NaN on one DDP rank skipped by both.

The fast tests kill a 1-process run twice; the slow ones (-m slow) ten times, and 2 DDP ranks.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wandb_records import history

ROOT = Path(__file__).resolve().parents[2]


def overrides(tmp: Path, ranks: int = 1, steps: int = 16) -> list[str]:
    """The tiny parts on a small rendered set, exact epochs of 48 samples (3 global batches of 16
    an epoch, so resumes land inside and at the end of epochs), 2 loader workers a rank,
    validation and sample callbacks on, a checkpoint every 2 steps."""
    shards = tmp / "shards"
    return [
        "unet=tiny",
        "vae=tiny",
        "text_encoder=tiny",
        "text_encoder.frozen=false",
        "data=shapes",
        f"data.prepare.out_dir={shards}",
        "data.prepare.n_train=48",
        "data.prepare.n_val=12",
        "data.prepare.shard_size=16",
        f"data.train_shards={shards}/train/*.tar",
        f"data.val_shards={shards}/val/*.tar",
        "+data.mode=exact",
        f"data.batch_size={16 // ranks}",
        "data.num_workers=2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.sample_grid.every_n_steps=8",
        "callbacks.sample_grid.sampler.steps=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.adherence.n_prompts=2",
        "callbacks.adherence.sampler.steps=2",
        "+callbacks.batch_keys._target_=ldm.training.callbacks.BatchKeys",
        "resume=auto",
        *(
            ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={ranks}"]
            if ranks > 1
            else []
        ),
    ]


def start(args: list[str], run_dir: Path, home: Path) -> subprocess.Popen:
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
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


def run_with_kills(args, run_dir: Path, home: Path, kills: int, seed: int) -> int:
    """Run to the end, killing the run `kills` times: once while a checkpoint is being
    written, the others after a random number of batches plus a random delay. Returns the
    number of attempts."""
    rng, attempts = random.Random(seed), 0
    plan = ["checkpoint"] + ["batch"] * (kills - 1)
    while True:
        attempts += 1
        proc = start(args, run_dir, home)
        if plan:
            kind = plan.pop(rng.randrange(len(plan)))
            if kind == "checkpoint":
                folder = run_dir / "checkpoints"
                hit = wait(proc, lambda: folder.is_dir() and any(folder.glob(".*.tmp")))
            else:
                target = batches_done(run_dir) + rng.randint(1, 6)
                hit = wait(proc, lambda: batches_done(run_dir) >= target)
                time.sleep(rng.uniform(0, 0.3))
            if hit and proc.poll() is None:
                kill(proc)
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        return attempts


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


def check_same_run(alone: Path, killed: Path, ranks: int, epochs_of: int = 3) -> None:
    """Same keys and losses every batch on every rank, each sample once an exact epoch, the
    same W&B losses where the killed run's got written, bit-equal weights and checkpoint."""
    for rank in range(ranks):
        a, k = per_batch(alone, rank), per_batch(killed, rank)
        assert a == k and len(a) == 16 and all(loss is not None for _, loss in a.values())
    keys = [per_batch(alone, r) for r in range(ranks)]
    for epoch in range(16 // epochs_of):
        batch = range(1 + epoch * epochs_of, 1 + (epoch + 1) * epochs_of)
        read = [key for b in batch for r in range(ranks) for key in keys[r][b][0]]
        assert len(read) == len(set(read)) == 48
    logged, logged_killed = wandb_losses(alone), wandb_losses(killed)
    assert len(logged) == 16 and all(logged[s] == v for s, v in logged_killed.items())
    wa, wk = load_file(alone / "model.safetensors"), load_file(killed / "model.safetensors")
    assert wa.keys() == wk.keys() and all(torch.equal(wa[n], wk[n]) for n in wa)
    ca = torch.load(alone / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    ck = torch.load(killed / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert all(torch.equal(ca["state_dict"][n], ck["state_dict"][n]) for n in ca["state_dict"])
    assert ca["global_step"] == ck["global_step"] == 16


def resumed_vs_alone(tmp_path: Path, kills: int, ranks: int = 1) -> int:
    args = overrides(tmp_path, ranks)
    alone = start(args, tmp_path / "alone", tmp_path)
    _, err = alone.communicate(timeout=300)
    assert alone.returncode == 0, err.decode()[-3000:]
    attempts = run_with_kills(args, tmp_path / "killed", tmp_path, kills, seed=kills + ranks)
    check_same_run(tmp_path / "alone", tmp_path / "killed", ranks)
    return attempts


def test_a_run_killed_twice_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    assert resumed_vs_alone(tmp_path, kills=2) >= 2


@pytest.mark.slow
def test_a_run_killed_ten_times_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    assert resumed_vs_alone(tmp_path, kills=10) >= 6  # some kills land after the last batch


@pytest.mark.slow
def test_two_ddp_ranks_killed_and_resumed_match_the_run_left_alone(tmp_path):
    assert resumed_vs_alone(tmp_path, kills=10, ranks=2) >= 6
