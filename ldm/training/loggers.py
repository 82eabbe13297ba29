"""Weights & Biases logger that falls back to offline mode when there is no login or no network,
and logs each step once across resumes; in a Hydra sweep, one W&B group per sweep and one run
name per job (`name_sweep_run`)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from ldm.results import swept_keys

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


class StepOnceWandbLogger(WandbLogger):
    """A resumed run trains again, bit for bit, the steps between its checkpoint and the
    interruption; this logger does not log again the steps W&B already holds, so no step
    appears twice in a run. Online, those are the resumed run's (the server's summary holds
    the last `trainer/global_step` it received). Offline, where W&B cannot resume a run, each
    attempt writes a run folder of its own with the same id, and the last step handed to W&B
    is kept beside them: the folders hold disjoint steps (a kill may cost the few rows W&B
    had not written yet)."""

    _logged_before: int | None = None

    def _mark(self) -> Path:
        return Path(self.save_dir or ".") / "wandb" / f"{self.experiment.id}.last_step"

    def _last_logged_before(self) -> int:
        if self._logged_before is None:
            run, last = self.experiment, None
            if run.resumed and not run.offline:
                last = run.summary.get("trainer/global_step")
            elif run.offline and self._mark().is_file():
                text = self._mark().read_text().strip()
                last = int(text) if text.isdigit() else None
            self._logged_before = -1 if last is None else int(last)
        return self._logged_before

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if step is not None and step <= self._last_logged_before():
            return
        super().log_metrics(metrics, step)
        if step is not None and self.experiment.offline:
            mark = self._mark()
            mark.parent.mkdir(parents=True, exist_ok=True)
            tmp = mark.with_suffix(".tmp")
            tmp.write_text(str(step))
            os.replace(tmp, mark)


def wandb_logger(
    project: str = "ldm",
    name: str | None = None,
    group: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    **kwargs,
) -> StepOnceWandbLogger:
    mode, reason = resolve_mode(mode)
    if kwargs.get("resume") == "must" and mode != "online":
        kwargs["resume"] = "allow"  # offline, W&B cannot check that the run exists
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = StepOnceWandbLogger(
        project=project, name=name, group=group, save_dir=save_dir, mode=mode, **kwargs
    )
    if reason:
        run_dir = Path(logger.experiment.dir).parent  # starts the run, so the path is final
        log.warning("W&B offline: %s; upload this run later with `wandb sync %s`", reason, run_dir)
    return logger


def sweep_job_name(overrides: list[str], swept: set[str], job_num: int) -> str:
    """A job of a sweep named after its values of the swept keys (`optim.lr=1e-4,seed=1`),
    or its number when none of its overrides is swept."""
    return ",".join(o for o in overrides if o.split("=", 1)[0] in swept) or str(job_num)


def name_sweep_run(logger_cfg: DictConfig) -> None:
    """In a Hydra multirun, one W&B group per sweep (named after its directory) and one run per
    job, named after the job's overrides, unless the config names them."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or "group" not in logger_cfg:
        return
    if logger_cfg.group is None:
        logger_cfg.group = "sweep-" + "-".join(Path(hc.sweep.dir).parts[-2:])
    job = sweep_job_name(list(hc.overrides.task), set(swept_keys(hc.sweep.dir)), hc.job.num)
    logger_cfg.name = f"{logger_cfg.name}:{job}" if logger_cfg.get("name") else job
