"""One training run from a composed Hydra config: `train(cfg)`, what `train.py` and `ldm-train`
call. It builds the data module, the module, the callbacks, the logger and the trainer from the
config, fits, and exports the weights into Hydra's run folder.

A run folder is never overwritten: one that holds a run is continued (`resume=auto`) or refused,
and one Hydra made for this run is removed again when the run fails on its input before its
first checkpoint (`is_new`, `check_reuse`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoints import CheckpointError, load_weights
from ldm.checkpoints.export import export_run
from ldm.config import ConfigError
from ldm.data.shards import DataError, expand_shards
from ldm.fingerprint import digest
from ldm.precision import Precision
from ldm.training.callbacks import RunSummary
from ldm.training.checkpointing import continue_wandb_run, resume_from
from ldm.training.loggers import name_sweep_run
from ldm.training.trainer import (
    apply_global_batch,
    make_trainer,
    sampling_precision,
    trainer_precision,
)

log = logging.getLogger(__name__)
# The user's input was wrong: a run folder made for this run goes again (nothing of value yet).
INPUT_ERRORS = (CheckpointError, ConfigError, DataError, FileNotFoundError)
# What a command line turns into one `error:` line (ldm.config.exit_on): a run stopped by
# repeated non-finite steps too, its folder kept.
ERRORS = (*INPUT_ERRORS, FloatingPointError)
SUMMARY = "train_summary.json"  # written by the RunSummary callback
HYDRA_FILES = {".hydra", "train.log"}  # what Hydra writes into a run folder before main()


def train(cfg: DictConfig) -> Path:
    """Train `cfg` in Hydra's run folder; the exported weights' path (the run folder on the
    other ranks of a multi-process run)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    new = is_new(run_dir)
    try:
        if not new:
            check_reuse(cfg, run_dir)
        return fit(cfg, run_dir)
    except INPUT_ERRORS:
        if new and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # made for this run, of no value yet
        raise


def fit(cfg: DictConfig, run_dir: Path) -> Path:
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path, checkpoint = resume_from(cfg.resume, run_dir / "checkpoints")
    continue_wandb_run(cfg.logger, checkpoint)
    chosen = trainer_precision(cfg.trainer)  # resolved once, for the trainer and the cache
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    prepare(cfg, module, datamodule, chosen)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = make_logger(cfg)
    callbacks.append(RunSummary(run_dir / SUMMARY))
    trainer = make_trainer(cfg.trainer, chosen, callbacks=callbacks, logger=logger)
    apply_global_batch(trainer, datamodule, getattr(datamodule, "global_batch_size", None))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts its own W&B run
    if not trainer.is_global_zero:
        return run_dir
    return export_run(cfg, module, run_dir / cfg.export)


def prepare(cfg: DictConfig, module: L.LightningModule, datamodule, chosen: str) -> None:
    """What the run needs before its logger and trainer start: the `init=` weights, DreamBooth's
    class images, and (on rank 0) its data. Data made here, before a W&B run is opened and
    other processes are launched, fails a run with a missing dataset or a shard pattern that
    matches no file in seconds; Lightning's own `prepare_data` inside fit (where the other
    processes wait for it) then finds it made."""
    if cfg.get("init"):
        initialise(module, cfg.init, cfg.get("init_use_ema", False))
    if cfg.get("class_images") and rank_zero_only.rank == 0:
        make_class_images(
            cfg.class_images, module, cfg.data.image_size, sampling_precision(cfg.trainer)
        )
    if hasattr(datamodule, "use_encoders"):  # a latent cache: made with, and checked against, these
        datamodule.use_encoders(module.vae, module.text_encoder, chosen)
    if rank_zero_only.rank == 0:
        datamodule.prepare_data()  # renders embedded data, builds a latent cache, if missing
        expand_shards(cfg.data.train_shards)  # fail now, not in a worker, on a pattern with no file


def make_logger(cfg: DictConfig) -> Logger:
    """The run's logger (named after the job in a sweep), the whole resolved config logged."""
    name_sweep_run(cfg.logger)
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def initialise(module: L.LightningModule, path: str, use_ema: bool) -> None:
    """Fine-tuning: the parts a weights file holds (`export_parts`) from `path`, strictly; the
    EMA starts from them too."""
    parts = module.export_parts()
    ema = getattr(module, "ema", None)
    if (
        ema is not None
    ):  # export_parts names the EMA's U-Net; the file goes into the one that trains
        parts["unet"] = module.unet
    load_weights(parts, path, use_ema=use_ema)
    if ema is not None:
        ema.shadow.load_state_dict(module.unet.state_dict())
    log.info("initialised %s from %s", ", ".join(parts), path)


def make_class_images(
    class_images: DictConfig, module: L.LightningModule, image_size: int, precision: Precision
) -> None:
    """DreamBooth: the base model's images of the class prompt(s), made before the first step
    (reused when the same base and settings made them before), in the precision sample.py
    samples in (`sampling_precision`): the same class images on every CPU kind."""
    state = {k: v for k, v in module.state_dict().items() if k.startswith(("unet.", "text_"))}
    base = digest(state)
    with module.sampling_pipeline(precision) as pipe:
        instantiate(class_images).ensure(pipe, base, image_size)


def is_new(run_dir: Path) -> bool:
    """Whether the run folder was made for this run: it holds nothing but what Hydra has just
    written (an empty log; a log with lines, or any other file, means it was there before)."""
    log_file = run_dir / "train.log"
    entries = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    return entries <= HYDRA_FILES and (not log_file.exists() or log_file.stat().st_size == 0)


def check_reuse(cfg: DictConfig, run_dir: Path) -> None:
    """A folder that holds a run is continued (`resume=auto`) or refused, never overwritten."""
    held = [
        name
        for name in (cfg.export, SUMMARY, "checkpoints")
        if (run_dir / name).is_file()
        or ((run_dir / name).is_dir() and any((run_dir / name).iterdir()))
    ]
    if held and cfg.get("resume") != "auto":
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(held)}); pass resume=auto to continue "
            f"it, or choose another folder with hydra.run.dir=..."
        )
