"""Lightning checkpoints that survive a kill at any moment: written to a hidden temporary name,
fsynced and renamed into place (`AtomicCheckpointIO`); the newest `keep` kept, `last.ckpt` a link
moved in one rename after its target is complete (`Checkpoints`); `find_resume` picks the newest
one of a run directory (`resume=auto`), `resume_from` reads the one a run continues from. A
checkpoint also holds the W&B run id, so a resumed run logs into the same W&B run
(`continue_wandb_run`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict

from ldm.checkpoints.files import CheckpointError, load_torch_file
from ldm.fileio import atomic_path, temporary_path

log = logging.getLogger(__name__)
WANDB_ID = "wandb_run_id"


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `.NAME.tmp`, fsync, rename: a reader (or a resume after a crash) sees
    the previous file or the whole new one, never half of one. Remote paths keep Lightning's
    own writer (object stores replace whole objects anyway)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(path.parent)


class Checkpoints(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` keeping the newest `keep` checkpoints of the folder (-1:
    all; counted on disk among the names it writes, so a resumed run prunes what an earlier
    attempt wrote, and nothing else), with
    `last.ckpt` a link to the newest that moves only once that file is complete, and the W&B
    run id stored in each checkpoint. A name already there is replaced, not versioned: a
    resumed run writes where the interrupted one did."""

    def __init__(self, keep: int = 3, **kwargs) -> None:
        kwargs.setdefault("save_last", "link")
        super().__init__(save_top_k=-1, enable_version_counter=False, **kwargs)
        self.keep = keep

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep < 0 or not trainer.is_global_zero or self.dirpath is None:
            return
        folder = Path(self.dirpath)
        files = [p for p in folder.glob("*.ckpt") if self.wrote(p) and not p.is_symlink()]
        for old in sorted(files, key=lambda p: p.stat().st_mtime_ns)[: -self.keep or None]:
            if old.resolve() != Path(filepath).resolve():
                old.unlink(missing_ok=True)

    def wrote(self, path: Path) -> bool:
        """Whether `path` is a name this callback writes (`filename` with numbers in its
        fields): pruning never touches another file that happens to sit in the folder."""
        template = re.escape(self.filename or "{epoch}-{step}")
        field = r"\\\{([^}:\\]+)[^}]*\\\}"  # an escaped {name} or {name:format}
        pattern = re.sub(field, lambda m: f"(?:{re.escape(m[1])}=)?[-+.0-9e]+", template)
        return path.is_file() and re.fullmatch(rf"{pattern}(?:-v\d+)?\.ckpt", path.name) is not None

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = temporary_path(linkpath)
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            os.replace(tmp, linkpath)  # one rename: the old link or the new, never none
            fsync_dir(Path(linkpath).parent)
        trainer.strategy.barrier()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                checkpoint[WANDB_ID] = logger.experiment.id
        return super().on_save_checkpoint(trainer, pl_module, checkpoint)


def find_resume(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `folder` (`last.ckpt`'s target, else the newest
    `*.ckpt`), or None; leftovers of a write cut short are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    last = folder / "last.ckpt"
    if last.exists():  # a dangling link does not exist
        return last.resolve()
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint read as data (`weights_only=True`, memory-mapped: tensors and
    plain containers, never code), checked before Lightning resumes from it; everything this
    project puts into its checkpoints loads this way."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"resume={path}: no such checkpoint file")
    checkpoint = load_torch_file(p)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{p.name} is not a Lightning training checkpoint (no state_dict)")
    return checkpoint


def stored_wandb_id(checkpoint: dict) -> str | None:
    """The W&B run id a checkpoint was written under, if any."""
    run_id = checkpoint.get(WANDB_ID)
    return run_id if isinstance(run_id, str) else None


def resume_from(resume: str | None, checkpoints: Path) -> tuple[str | None, dict | None]:
    """`resume`: a checkpoint path, or `auto`: the newest complete checkpoint in `checkpoints`
    (a fresh start when there is none). (the path handed to Lightning, the checkpoint read as
    data): a local file is read before Lightning reads it, so a pickle runs nothing; a remote
    one is left to Lightning's own load (weights_only=True as well) and read as None."""
    if resume != "auto":
        path = resume
    else:
        found = find_resume(checkpoints)
        log.info("resume=auto: %s", f"continuing from {found}" if found else "no checkpoint yet")
        path = str(found) if found else None
    if not path or "://" in path:
        return path, None
    return path, read_checkpoint(path)


def continue_wandb_run(logger_cfg: DictConfig, checkpoint: dict | None) -> None:
    """A W&B logger (its config has a `group`) continues the run `checkpoint` was logged to,
    unless the config names a run id of its own."""
    if checkpoint is None or "group" not in logger_cfg or logger_cfg.get("id") is not None:
        return
    run_id = stored_wandb_id(checkpoint)
    if run_id:
        with open_dict(logger_cfg):
            logger_cfg.id, logger_cfg.resume = run_id, "must"
