"""The checkpoint a run continues from (`resume=FILE | auto`) and the W&B run it continues."""

import os

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoints import CheckpointError
from ldm.training.checkpointing import WANDB_ID, continue_wandb_run, resume_from


def write_checkpoint(path, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, **extra}, path)
    return path


def test_auto_without_a_checkpoint_is_a_fresh_start(tmp_path):
    assert resume_from("auto", tmp_path / "checkpoints") == (None, None)
    assert resume_from(None, tmp_path / "checkpoints") == (None, None)


def test_auto_continues_from_the_newest_checkpoint_read_as_data(tmp_path):
    folder = tmp_path / "checkpoints"
    old = write_checkpoint(folder / "epoch=0-step=2.ckpt")
    new = write_checkpoint(folder / "epoch=0-step=4.ckpt", **{WANDB_ID: "run4"})
    os.utime(old, (1, 1))
    path, checkpoint = resume_from("auto", folder)
    assert path == str(new) and checkpoint[WANDB_ID] == "run4"
    assert torch.equal(checkpoint["state_dict"]["w"], torch.ones(2))


def test_a_named_checkpoint_is_read_and_a_missing_or_foreign_one_refused(tmp_path):
    named = write_checkpoint(tmp_path / "elsewhere.ckpt")
    assert resume_from(str(named), tmp_path / "checkpoints")[0] == str(named)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resume_from(str(tmp_path / "missing.ckpt"), tmp_path / "checkpoints")
    torch.save({"weights": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint"):
        resume_from(str(tmp_path / "foreign.ckpt"), tmp_path / "checkpoints")


def test_a_remote_checkpoint_is_left_to_lightning(tmp_path):
    url = "s3://bucket/last.ckpt"
    assert resume_from(url, tmp_path / "checkpoints") == (url, None)


def wandb_config(**fields):
    cfg = OmegaConf.create({"logger": {"project": "ldm", "group": None, **fields}})
    OmegaConf.set_struct(cfg, True)
    return cfg.logger


def test_the_w_and_b_run_of_the_checkpoint_continues():
    logger = wandb_config()
    continue_wandb_run(logger, {WANDB_ID: "abc123"})
    assert logger.id == "abc123" and logger.resume == "must"


@pytest.mark.parametrize(
    "logger,checkpoint",
    [
        ({"project": "ldm", "group": None, "id": "mine"}, {WANDB_ID: "abc123"}),  # named run
        ({"save_dir": "."}, {WANDB_ID: "abc123"}),  # not a W&B logger
        ({"project": "ldm", "group": None}, {}),  # written without W&B
        ({"project": "ldm", "group": None}, None),  # a fresh start
    ],
)
def test_otherwise_the_logger_config_is_left_as_it_is(logger, checkpoint):
    cfg = OmegaConf.create(logger)
    continue_wandb_run(cfg, checkpoint)
    assert OmegaConf.to_container(cfg) == logger
