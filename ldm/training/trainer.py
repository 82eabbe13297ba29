"""The Lightning trainer of a run, built from its config with the precision this hardware
should compute in (`ldm.precision`: `trainer.precision=auto` by default)."""

from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig

from ldm import precision
from ldm.config import ConfigError
from ldm.training.amp import precision_plugin
from ldm.training.checkpointing import AtomicCheckpointIO

log = logging.getLogger(__name__)


def trainer_precision(trainer_cfg: DictConfig) -> str:
    """`trainer.precision`, with "auto" resolved for this hardware, said once in the log."""
    chosen = precision.resolve(trainer_cfg.get("precision"), trainer_cfg.get("accelerator"))
    log.info("precision: %s (%s)", chosen.value, chosen.reason)
    return chosen.value


def sampling_precision(trainer_cfg: DictConfig) -> precision.Precision:
    """The precision a run draws images in outside the trainer (DreamBooth's class images):
    as sample.py samples, float32 on a CPU under "auto", so every CPU kind draws the same."""
    return precision.resolve(
        trainer_cfg.get("precision"), trainer_cfg.get("accelerator"), sampling=True
    )


def make_trainer(trainer_cfg: DictConfig, value: str | None = None, **kwargs) -> L.Trainer:
    """`lightning.Trainer` from the `trainer` config node, in precision `value` (resolved from
    the config when not given); `kwargs` (callbacks, logger) added.
    Checkpoints are written atomically (`AtomicCheckpointIO`); mixed precision and FSDP use the
    plugins of `ldm.training.amp`, under which a fused optimizer clips its gradients."""
    if trainer_cfg.get("accelerator") == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator=gpu but this machine has no CUDA device: use trainer=cpu "
            "(or trainer.accelerator=auto)"
        )
    if torch.cuda.is_available():  # TF32 matmuls and convolutions where the GPU has them
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str):
        strategy = instantiate(strategy)
    value = value or trainer_precision(trainer_cfg)
    device = precision.device_type(trainer_cfg.get("accelerator"))
    plugin = precision_plugin(value, device, fsdp=isinstance(strategy, FSDPStrategy))
    plugins = [AtomicCheckpointIO(), *([plugin] if plugin else [])]
    return instantiate(
        trainer_cfg,
        strategy=strategy,
        precision=None if plugin else value,
        plugins=plugins,
        **kwargs,
    )


def split_global_batch(global_batch: int, max_per_device: int, world: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) making `global_batch` on `world` devices with
    at most `max_per_device` samples a device at a time."""
    if global_batch % world:
        raise ConfigError(
            f"data.global_batch_size={global_batch} does not divide over {world} devices; "
            f"pick a multiple of {world}"
        )
    per_device = global_batch // world
    accumulate = -(-per_device // max_per_device)
    while per_device % accumulate:  # the fewest accumulation steps of equal micro-batches
        accumulate += 1
    return per_device // accumulate, accumulate


def apply_global_batch(trainer: L.Trainer, datamodule, global_batch: int | None) -> None:
    """With `data.global_batch_size` set, derive the per-device batch (at most
    `data.batch_size`) and the accumulation from the number of devices, so the global batch
    stays fixed when it changes."""
    if not global_batch:
        return
    per_device, accumulate = split_global_batch(
        global_batch, datamodule.batch_size, trainer.world_size
    )
    datamodule.batch_size, trainer.accumulate_grad_batches = per_device, accumulate
    log.info(
        "global batch %d = %d devices x %d x %d accumulated",
        global_batch,
        trainer.world_size,
        per_device,
        accumulate,
    )
