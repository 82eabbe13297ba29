"""Train a model from a composed Hydra config: `python train.py [experiment=NAME] [key=value]`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoints import CheckpointError, load_weights
from ldm.checkpoints.export import export_run
from ldm.config import ConfigError, exit_on, register_resolvers
from ldm.data.shards import DataError, expand_shards
from ldm.results import swept_keys
from ldm.training.checkpointing import find_resume, read_checkpoint, stored_wandb_id
from ldm.training.trainer import apply_global_batch, make_trainer, trainer_precision

log = logging.getLogger("train")
register_resolvers()


def name_sweep_run(cfg: DictConfig) -> None:
    """In a multirun, one W&B group per sweep (named after its directory) and one run per job,
    named after the job's overrides, unless the config names them."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or "group" not in cfg.logger:
        return
    if cfg.logger.group is None:
        cfg.logger.group = "sweep-" + "-".join(Path(hc.sweep.dir).parts[-2:])
    swept = set(swept_keys(hc.sweep.dir))
    job = ",".join(o for o in hc.overrides.task if o.split("=", 1)[0] in swept) or str(hc.job.num)
    cfg.logger.name = f"{cfg.logger.name}:{job}" if cfg.logger.get("name") else job


def initialise(module: L.LightningModule, path: str, use_ema: bool) -> None:
    """Fine-tuning: the parts' weights from `path`, strictly; the EMA starts from them too."""
    parts = {k: getattr(module, k) for k in ("unet", "vae", "text_encoder") if hasattr(module, k)}
    if hasattr(module, "autoencoder"):  # a first stage's own training
        parts["vae"] = module.autoencoder
    load_weights(parts, path, use_ema=use_ema)
    if getattr(module, "ema", None) is not None:
        module.ema.shadow.load_state_dict(module.unet.state_dict())
    log.info("initialised %s from %s", ", ".join(parts), path)


def make_class_images(cfg: DictConfig, module: L.LightningModule) -> None:
    """DreamBooth: the base model's images of the class prompt(s), made before the first step
    (reused when the same base and settings made them before)."""
    import hashlib

    from ldm.precision import resolve
    from ldm.training.module import fingerprint

    state = {k: v for k, v in module.state_dict().items() if k.startswith(("unet.", "text_"))}
    base = hashlib.sha256(json.dumps(fingerprint(state, set(state))).encode()).hexdigest()
    # Sampled as sample.py samples (float32 on a CPU): the same class images on every CPU kind.
    precision = resolve(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"), sampling=True)
    with module.sampling_pipeline(precision) as pipe:
        instantiate(cfg.class_images).ensure(pipe, base, cfg.data.image_size)


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """`resume`: a checkpoint path, or `auto`: the newest complete checkpoint of this run
    directory (a fresh start when there is none), and the W&B run it was logged to."""
    if cfg.resume != "auto":
        path = cfg.resume
    else:
        found = find_resume(run_dir / "checkpoints")
        log.info("resume=auto: %s", f"continuing from {found}" if found else "no checkpoint yet")
        path = str(found) if found else None
    if not path or "://" in path:  # remote: Lightning's own load, weights_only=True as well
        return path
    checkpoint = read_checkpoint(path)  # as data, before Lightning reads it: a pickle runs nothing
    if "group" in cfg.logger and cfg.logger.get("id") is None:
        run_id = stored_wandb_id(checkpoint)
        if run_id:  # the same W&B run continues
            with open_dict(cfg):
                cfg.logger.id, cfg.logger.resume = run_id, "must"
    return path


def fit(cfg: DictConfig, run_dir: Path) -> Path:
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_path(cfg, run_dir)
    chosen = trainer_precision(cfg.trainer)  # resolved once, for the trainer and the cache
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    if cfg.get("init"):
        initialise(module, cfg.init, cfg.get("init_use_ema", False))
    if cfg.get("class_images") and rank_zero_only.rank == 0:
        make_class_images(cfg, module)
    if hasattr(datamodule, "use_encoders"):  # a latent cache: made with, and checked against, these
        datamodule.use_encoders(module.vae, module.text_encoder, chosen)
    if rank_zero_only.rank == 0:  # the other processes wait for it in Lightning's own prepare_data
        datamodule.prepare_data()  # renders embedded data, builds a latent cache, if missing
        expand_shards(cfg.data.train_shards)  # fail now, not in a worker, on a pattern with no file
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    name_sweep_run(cfg)
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = make_trainer(cfg.trainer, chosen, callbacks=callbacks, logger=logger)
    apply_global_batch(trainer, datamodule, getattr(datamodule, "global_batch_size", None))
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts its own W&B run
    if not trainer.is_global_zero:
        return run_dir
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    summary = {
        "step": trainer.global_step,
        "minutes": (time.perf_counter() - start) / 60,
        "precision": str(trainer.precision),
        "interrupted": trainer.interrupted,
        # Lightning's own count (what max_time limits), across resumptions:
        "train_minutes": timer.time_elapsed("train") / 60 if timer else None,
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return export_run(cfg, module, run_dir / cfg.export)


HYDRA_FILES = {".hydra", "train.log"}  # what Hydra writes into a run folder before main()


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
        for name in (cfg.export, "train_summary.json", "checkpoints")
        if (run_dir / name).is_file()
        or ((run_dir / name).is_dir() and any((run_dir / name).iterdir()))
    ]
    if held and cfg.get("resume") != "auto":
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(held)}); pass resume=auto to continue "
            f"it, or choose another folder with hydra.run.dir=..."
        )


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@exit_on(CheckpointError, ConfigError, DataError, FileNotFoundError, FloatingPointError)
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    new = is_new(run_dir)
    try:
        if not new:
            check_reuse(cfg, run_dir)
        fit(cfg, run_dir)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError):
        if new and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # made for this run, of no value yet
        raise


if __name__ == "__main__":
    main()
