"""Lightning module that trains the first-stage autoencoder.

The recipe is deliberately simple: pixel reconstruction (L1 + L2 mix, no perceptual or
adversarial term since nothing can be downloaded) plus a small KL pull towards N(0, I).
Validation reports PSNR and the statistics of the posterior mode, from which the recipe
sets ``scale_factor = 1 / std`` (and ``shift_factor = mean``) so the diffusion model sees
roughly unit-variance latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ldm.models.autoencoder import AutoencoderKL

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images, measured after mapping them to [0, 1] -> (B,)."""
    rec01 = ((reconstruction.float() + 1) / 2).clamp(0, 1)
    target01 = ((target.float() + 1) / 2).clamp(0, 1)
    mse = (rec01 - target01).pow(2).flatten(1).mean(dim=1)  # (B,)
    # The floor keeps a perfect reconstruction finite (caps PSNR at 100 dB).
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class AutoencoderTraining(L.LightningModule):
    """Trains an injected ``AutoencoderKL`` on batches ``{"image": (B, 3, H, W) in [-1, 1], ...}``.

    ``optimizer`` and ``lr_scheduler`` are factories (``functools.partial`` or Hydra
    ``_partial_: true``) called with the parameters / the optimizer. The scheduler, if
    any, steps every optimisation step.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        optimizer: OptimizerFactory,
        kl_weight: float = 1e-6,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        lr_scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.kl_weight = kl_weight
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.save_hyperparameters(ignore=["autoencoder", "optimizer", "lr_scheduler"])
        # Results of the last validation epoch (None before the first one).
        self.latent_mean: float | None = None
        self.latent_std: float | None = None
        self._reset_latent_stats()

    def reconstruction_loss(
        self, reconstruction: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Per-element mean of ``l1_weight * |x - x'| + l2_weight * (x - x')^2``."""
        l1 = F.l1_loss(reconstruction, target)
        l2 = F.mse_loss(reconstruction, target)
        return self.l1_weight * l1 + self.l2_weight * l2

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        reconstruction, posterior = self.autoencoder(images, sample=True)
        rec_loss = self.reconstruction_loss(reconstruction, images)
        kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch
        # SD sums both terms over elements; the reconstruction here is a per-element mean,
        # so the KL is divided by the image size to keep kl_weight's SD meaning.
        loss = rec_loss + self.kl_weight * kl / images[0].numel()
        self.log_dict(
            {"train/rec_loss": rec_loss, "train/kl": kl, "train/loss": loss},
            prog_bar=True,
            batch_size=images.shape[0],
        )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        z = self.autoencoder.posterior(images).mode()  # (B, C, h, w), deterministic
        reconstruction = self.autoencoder.decode_unscaled(z)
        metrics = {
            "val/rec_loss": self.reconstruction_loss(reconstruction, images),
            "val/psnr": psnr(reconstruction, images).mean(),
        }
        self.log_dict(metrics, batch_size=images.shape[0], sync_dist=True)
        self._accumulate_latent_stats(z)

    def on_validation_epoch_start(self) -> None:
        self._reset_latent_stats()

    def on_validation_epoch_end(self) -> None:
        mean, std = self._latent_mean_std()
        if mean is None:
            return
        self.latent_mean, self.latent_std = mean, std
        self.log_dict({"val/latent_mean": mean, "val/latent_std": std})

    def export_parts(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.autoencoder}

    def latent_scale_and_shift(self) -> tuple[float, float]:
        """``(scale_factor, shift_factor)`` that whiten the latents of the last validation."""
        if self.latent_std is None or self.latent_mean is None:
            raise RuntimeError("run a validation epoch first")
        return 1.0 / self.latent_std, self.latent_mean

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.autoencoder.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- latent statistics over the whole validation set --------------------------------

    def _reset_latent_stats(self) -> None:
        # float64 running sums: a validation set has millions of latent elements.
        self._latent_sums = torch.zeros(3, dtype=torch.float64)  # (count, sum, sum of squares)

    def _accumulate_latent_stats(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        batch_sums = torch.stack([z.new_tensor(z.numel()), z.sum(), z.pow(2).sum()])
        # Accumulate on z's device: moving to the CPU here would sync every step.
        self._latent_sums = self._latent_sums.to(z.device) + batch_sums

    def _latent_mean_std(self) -> tuple[float | None, float | None]:
        sums = self._latent_sums.to(self.device)
        if self.trainer.world_size > 1:
            # Sum the per-rank statistics (the collective needs them on the rank's device).
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        count, total, total_sq = sums.tolist()
        if count == 0:
            return None, None
        mean = total / count
        variance = max(total_sq / count - mean * mean, 0.0)
        return mean, math.sqrt(variance)
