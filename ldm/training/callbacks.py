"""Lightning callbacks: sample grids, throughput, validation metrics to CSV, data counts, the keys
of each batch, the run's summary (the shapes set's adherence: ldm.shapes.adherence)."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import WandbLogger

from ldm.data.filters import add_counts, new_counts
from ldm.diffusion import conditioning
from ldm.diffusion.conditioning import Condition
from ldm.diffusion.samplers import SamplerConfig
from ldm.pipeline import image_grid

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_ema(
    trainer: L.Trainer,
    pl_module,
    prompts: list[str],
    seeds: list[int],
    sampler: SamplerConfig,
    height: int,
    width: int,
) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 from the EMA U-Net, in the trainer's precision (callbacks run
    outside its autocast), the text encoder in eval mode meanwhile."""
    with pl_module.sampling_pipeline() as pipe, trainer.precision_plugin.forward_context():
        return pipe(prompts, seeds, sampler, height=height, width=width)


class SampleGrid(L.Callback):
    """At the start (the model before training: the base of a fine-tune), every `every_n_steps`
    and at the end, sample fixed prompts with fixed seeds from the EMA (or adapted) U-Net;
    write the grid to `<run dir>/samples/step_XXXXXX.png` and log it to W&B."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        seed: int = 0,
        sampler: SamplerConfig | None = None,
        height: int = 64,
        width: int = 64,
        out_dir: str = "samples",
    ) -> None:
        self.prompts, self.every_n_steps, self.seed = list(prompts), every_n_steps, seed
        self.sampler = sampler or SamplerConfig(steps=25)
        self.height, self.width, self.out_dir = height, width, out_dir
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module) -> Path | None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return None
        self._last_step = step
        seeds = [self.seed + i for i in range(len(self.prompts))]
        images = sample_ema(
            trainer, pl_module, self.prompts, seeds, self.sampler, self.height, self.width
        )
        grid = image_grid(images)
        path = Path(trainer.default_root_dir) / self.out_dir / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.log_image("samples", [grid], step=step, caption=[f"step {step}"])
        return path


# Dense bf16 / TF32 tensor-core peaks (TFLOP/s, without sparsity) by GPU name, for MFU.
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),  # SXM; the PCIe card: ~756 / 378
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
    "L4": (121.0, 60.0),
    "4090": (165.0, 83.0),
    "3090": (71.0, 36.0),
}


def device_peak_tflops(device: torch.device, half: bool) -> float | None:
    """The device's peak dense TFLOP/s in bf16/fp16 (`half`) or TF32, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in GPU_PEAK_TFLOPS.items():
        if key in name:
            return bf16 if half else tf32
    return None


def unet_train_flops(unet: torch.nn.Module, latents: torch.Tensor, cond: Condition) -> float:
    """FLOPs of one training image through the U-Net: torch's count of a forward, times 3
    (the backward costs about twice the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.zeros(1, dtype=torch.long, device=latents.device)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:  # its hooks need grad
        conditioning.apply(unet, latents[:1], t, conditioning.rows(cond, slice(0, 1)))
    return 3.0 * counter.get_total_flops()


class Throughput(L.Callback):
    """Every `window` batches, logs (perf/...): images/s over all ranks and per device, U-Net
    TFLOP/s per device and MFU (model FLOPs utilisation: against the device's peak, from
    `GPU_PEAK_TFLOPS` or `peak_tflops`), the fraction of the time spent waiting for data
    (between one batch's end and the next one's start), and the peak memory (GPU: allocated
    by torch; CPU: the process's resident set)."""

    def __init__(self, window: int = 20, peak_tflops: float | None = None) -> None:
        self.window, self.peak_tflops = window, peak_tflops
        self.flops_per_image, self._t0, self._end, self._n, self._wait = None, None, None, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._n, self._wait = now, 0, 0.0
        elif self._end is not None:
            self._wait += now - self._end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        self._n += len(batch["caption"])
        if self.flops_per_image is None and hasattr(pl_module, "unet"):
            try:
                self.flops_per_image = self.count_flops(pl_module, batch)
            except Exception as e:  # e.g. a sharded U-Net: report the rest
                log.warning("no U-Net FLOP count (%s): no TFLOP/s or MFU", e)
                self.flops_per_image = 0.0
        if (batch_idx + 1) % self.window == 0 and self._t0 is not None:
            seconds = self._end - self._t0
            metrics = self.measure(trainer, pl_module, seconds)
            if trainer.is_global_zero:  # straight to the loggers: logged once, at this step
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
            self._t0, self._end = None, None

    def count_flops(self, pl_module, batch) -> float:
        first = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v) or k == "caption"}
        mean, _ = pl_module.posterior(first)
        with torch.no_grad():
            cond = pl_module.condition(first, keep=torch.ones(1, dtype=torch.bool))
        return unet_train_flops(pl_module.unet, mean.float(), cond)

    def measure(self, trainer, pl_module, seconds: float) -> dict[str, float]:
        rate = self._n / seconds
        out = {
            "perf/images_per_s": rate * trainer.world_size,
            "perf/images_per_s_per_device": rate,
            "perf/data_wait": self._wait / seconds,
        }
        if self.flops_per_image:
            tflops = rate * self.flops_per_image / 1e12
            out["perf/unet_tflops"] = tflops
            half = "16" in str(trainer.precision)
            peak = self.peak_tflops or device_peak_tflops(pl_module.device, half)
            if peak:
                out["perf/mfu"] = tflops / peak
        if pl_module.device.type == "cuda":
            out["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        else:
            import resource

            out["perf/peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out


class MetricsCSV(L.Callback):
    """After each validation, append the step and every logged `val/*` and `train/loss` value
    to `<run dir>/metrics.csv`, so a sweep can be tabulated without reading W&B files.

    The file is rewritten whole each time: a metric first logged later widens the header.
    """

    def __init__(self, filename: str = "metrics.csv") -> None:
        self.filename, self.rows = filename, []

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run keeps the rows of the steps its checkpoint had seen."""
        path = Path(trainer.default_root_dir) / self.filename
        if trainer.global_step and path.is_file() and not self.rows:
            with open(path, newline="") as f:
                rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
            self.rows = [{**r, "step": int(r["step"])} for r in rows]
            self.rows = [r for r in self.rows if r["step"] <= trainer.global_step]

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.rows = [r for r in self.rows if r["step"] != trainer.global_step]  # a re-validation
        row = {"step": trainer.global_step}
        row.update(
            {
                k: float(v)
                for k, v in sorted(trainer.callback_metrics.items())
                if k.startswith("val/") or k == "train/loss"
            }
        )
        self.rows.append(row)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


class DataCounts(L.Callback):
    """Sums the per-batch `counts` over batches and ranks: running totals logged as `data/kept`
    and `data/rejected/<reason>`. The cross-rank sum runs every `every_n_steps` (on all ranks
    together); the latest sum is logged every step, for the logger to pick at its own interval."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps, self.totals, self.reduced = every_n_steps, new_counts(), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, dict) or "counts" not in batch:
            return
        add_counts(self.totals, batch["counts"])
        if self.reduced is None or trainer.global_step % self.every_n_steps == 0:
            names = sorted(self.totals)
            local = torch.tensor([float(self.totals[k]) for k in names], device=pl_module.device)
            total = trainer.strategy.reduce(local, reduce_op="sum")
            self.reduced = {f"data/{k}": v for k, v in zip(names, total)}
        pl_module.log_dict(self.reduced, on_step=True, on_epoch=False)


class BatchKeys(L.Callback):
    """Appends, for every training batch, `{"batch": n, "step": global step, "loss": this rank's
    loss (None for a skipped batch), "keys": [...]}` to
    `<run dir>/batch_keys/rank<R>.jsonl` (flushed each line): which samples each rank trained on,
    to audit a run's data or check that a resumed run read what an uninterrupted one did."""

    def __init__(self, folder: str = "batch_keys") -> None:
        self.folder, self.file = folder, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.file is None:
            path = Path(trainer.default_root_dir) / self.folder / f"rank{trainer.global_rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")
        number = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        line = {
            "batch": number,
            "step": trainer.global_step,
            "loss": None if loss is None else float(loss),
            "keys": list(batch["key"]),
        }
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RunSummary(L.Callback):
    """Writes `path` (the run folder's `train_summary.json`) on rank 0 when fit ends, before the
    weights are exported: the step reached, the minutes since this callback was made (just
    before the trainer: the fit's launch and setup count), the precision trained in, whether
    the run was interrupted, and Lightning's own training minutes (what `max_time` limits,
    across resumptions; None without a Timer)."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.start = Path(path), time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        summary = {
            "step": trainer.global_step,
            "minutes": (time.perf_counter() - self.start) / 60,
            "precision": str(trainer.precision),
            "interrupted": trainer.interrupted,
            "train_minutes": timer.time_elapsed("train") / 60 if timer else None,
        }
        self.path.write_text(json.dumps(summary, indent=2) + "\n")
