"""Runs killed with SIGKILL and resumed with `resume=auto` (Lightning's own checkpointing with our
atomic writer and stateful loader) against the run left alone: the same samples per step, the
same losses and final weights, bit for bit.

The fast test kills a 1-process run once, while it writes a checkpoint; the slow ones
(-m slow) ten times, and 2 DDP ranks ten times.
"""

import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.runs import (
    batches_done,
    finish,
    kill,
    logged_twice,
    overrides,
    per_batch,
    start,
    wait,
    wandb_losses,
)


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

                # a later checkpoint than the first: the run then resumes from the one before
                def writing() -> bool:
                    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
                    return any(n.endswith(".tmp") for n in names) and "last.ckpt" in names

                hit = wait(proc, writing)
            else:
                target = batches_done(run_dir) + rng.randint(1, 3)
                hit = wait(proc, lambda: batches_done(run_dir) >= target)
                time.sleep(rng.uniform(0, 0.3))
            if hit and proc.poll() is None:
                kill(proc)
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        return attempts


def check_same_run(alone: Path, killed: Path, ranks: int, epochs_of: int = 3) -> None:
    """Same keys and losses every batch on every rank, each sample once an exact epoch, the
    same W&B losses where the killed run's got written and no step logged twice, bit-equal
    weights and checkpoint."""
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
    assert logged_twice(killed) == []
    wa, wk = load_file(alone / "model.safetensors"), load_file(killed / "model.safetensors")
    assert wa.keys() == wk.keys() and all(torch.equal(wa[n], wk[n]) for n in wa)
    ca = torch.load(alone / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    ck = torch.load(killed / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert all(torch.equal(ca["state_dict"][n], ck["state_dict"][n]) for n in ca["state_dict"])
    assert ca["global_step"] == ck["global_step"] == 16


def resumed_vs_alone(tmp_path: Path, alone: Path, kills: int, ranks: int = 1) -> int:
    args = overrides(tmp_path, ranks)
    if ranks > 1:
        finish(args, tmp_path / "alone", tmp_path)
        alone = tmp_path / "alone"
    attempts = run_with_kills(args, tmp_path / "killed", tmp_path, kills, seed=kills + ranks)
    check_same_run(alone, tmp_path / "killed", ranks)
    return attempts


def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(tmp_path, alone_run):
    assert resumed_vs_alone(tmp_path, alone_run, kills=1) == 2


@pytest.mark.slow
def test_a_run_killed_ten_times_resumes_to_the_same_weights_bit_for_bit(tmp_path, alone_run):
    assert resumed_vs_alone(tmp_path, alone_run, kills=10) >= 9  # the last may land after the end


@pytest.mark.slow
def test_two_ddp_ranks_killed_and_resumed_match_the_run_left_alone(tmp_path):
    assert resumed_vs_alone(tmp_path, None, kills=10, ranks=2) >= 9
