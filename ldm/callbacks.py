"""Lightning callbacks: sample grids during training, and a throughput meter."""
from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from ldm.pipeline import Pipeline, SamplerConfig


def image_grid(images: torch.Tensor, ncols: int | None = None) -> Image.Image:
    """(B, H, W, 3) uint8 -> one PIL image, row-major, with a 2-pixel gutter."""
    b, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = Image.new("RGB", (ncols * (w + 2) + 2, nrows * (h + 2) + 2), (255, 255, 255))
    for i, img in enumerate(images.numpy()):
        grid.paste(Image.fromarray(img), (2 + (i % ncols) * (w + 2), 2 + (i // ncols) * (h + 2)))
    return grid


class SampleGrid(L.Callback):
    """Every `every_n_steps` (and at the end) sample fixed prompts with fixed seeds from the EMA
    U-Net; write the grid to `<run dir>/samples/step_XXXXXX.png` and log it to W&B."""

    def __init__(self, prompts: list[str], every_n_steps: int = 500, seed: int = 0,
                 sampler: SamplerConfig | None = None, height: int = 64, width: int = 64,
                 out_dir: str = "samples") -> None:
        self.prompts, self.every_n_steps, self.seed = list(prompts), every_n_steps, seed
        self.sampler = sampler or SamplerConfig(steps=25)
        self.height, self.width, self.out_dir = height, width, out_dir
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module) -> Path | None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return None
        self._last_step = step
        pipe = Pipeline(pl_module.ema.shadow, pl_module.vae, pl_module.text_encoder,
                        pl_module.objective.schedule, pl_module.objective.prediction)
        was_training = pl_module.text_encoder.training
        pl_module.text_encoder.eval()
        seeds = [self.seed + i for i in range(len(self.prompts))]
        images = pipe(self.prompts, seeds, self.sampler, height=self.height, width=self.width)
        pl_module.text_encoder.train(was_training)
        grid = image_grid(images)
        path = Path(trainer.default_root_dir) / self.out_dir / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.log_image("samples", [grid], step=step, caption=[f"step {step}"])
        return path


class Throughput(L.Callback):
    """Logs training images per second (wall clock, averaged over `window` steps)."""

    def __init__(self, window: int = 20) -> None:
        self.window, self._t0, self._n = window, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._n += len(batch["caption"])
        if (batch_idx + 1) % self.window == 0:
            rate = self._n / (time.perf_counter() - self._t0)
            pl_module.log("perf/images_per_s", rate, prog_bar=True)
            self._t0 = None
