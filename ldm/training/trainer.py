"""The Lightning trainer of a run, built from its config with the precision this hardware
should compute in (`ldm.precision`: `trainer.precision=auto` by default)."""

from __future__ import annotations

import logging

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm import precision

log = logging.getLogger(__name__)


def trainer_precision(trainer_cfg: DictConfig) -> str:
    """`trainer.precision`, with "auto" resolved for this hardware, said once in the log."""
    chosen = precision.resolve(trainer_cfg.get("precision"), trainer_cfg.get("accelerator"))
    log.info("precision: %s (%s)", chosen.value, chosen.reason)
    return chosen.value


def make_trainer(trainer_cfg: DictConfig, **kwargs) -> L.Trainer:
    """`lightning.Trainer` from the `trainer` config node; `kwargs` (callbacks, logger) added."""
    return instantiate(trainer_cfg, precision=trainer_precision(trainer_cfg), **kwargs)
