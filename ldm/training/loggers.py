"""Weights & Biases logger that falls back to offline mode when there is no login or no network."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    """A key in the environment, in wandb's settings, or in ~/.netrc (`wandb login` puts it
    there)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    try:
        import wandb

        return bool(wandb.setup().settings.api_key)
    except Exception:
        return False


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str = "auto") -> tuple[str, str | None]:
    """(mode, reason) where reason explains a fallback to offline."""
    mode = os.environ.get("WANDB_MODE", mode) if mode == "auto" else mode
    if mode != "auto":
        return mode, None
    if not _has_api_key():
        return "offline", "not logged in to W&B (run `wandb login` to log online)"
    if not _reachable():
        return "offline", "the W&B server cannot be reached"
    return "online", None


def wandb_logger(
    project: str = "ldm",
    name: str | None = None,
    group: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    **kwargs,
) -> WandbLogger:
    mode, reason = resolve_mode(mode)
    if kwargs.get("resume") == "must" and mode != "online":
        kwargs["resume"] = "allow"  # offline, W&B cannot check that the run exists
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project, name=name, group=group, save_dir=save_dir, mode=mode, **kwargs
    )
    if reason:
        run_dir = Path(logger.experiment.dir).parent  # starts the run, so the path is final
        log.warning("W&B offline: %s; upload this run later with `wandb sync %s`", reason, run_dir)
    return logger
