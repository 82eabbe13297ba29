"""`LatentDiffusion`: the Lightning module training a U-Net in the latent space of a frozen VAE."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch import nn

from ldm.diffusion.objective import DiffusionObjective
from ldm.models.text_encoder import TextEncoder
from ldm.training.ema import EMA


def keep_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool: which captions survive caption dropout with probability p. Dropped ones become
    the empty prompt, which teaches the unconditional model classifier-free guidance needs."""
    return torch.rand(n, generator=generator) >= p


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear learning-rate warmup from 0, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


class LatentDiffusion(L.LightningModule):
    """Frozen VAE + trainable U-Net + text encoder (trained or frozen) + an EMA of the U-Net.

    Batches are dicts {"image": (B, 3, H, W) in [-1, 1], "caption": list[str]}, or cached VAE
    posteriors {"latent_mean", "latent_std": (B, C, h, w), "caption"} with, from a cache made
    with the (frozen) text encoder, {"context": (B, L, D), "empty_context": (1, L, D)}.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: TextEncoder,
        objective: DiffusionObjective,
        optimizer: Callable,
        warmup_steps: int = 100,
        caption_dropout: float = 0.1,
        ema_decay: float = 0.999,
    ) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.objective = unet, text_encoder, objective
        self.vae = vae.requires_grad_(False).eval()  # frozen: no grad, no optimizer state
        self.ema = EMA(unet, ema_decay)
        self.optimizer_factory, self.warmup_steps = optimizer, warmup_steps
        self.caption_dropout = caption_dropout

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.vae.eval()  # Lightning calls train() every epoch: keep the frozen parts in eval
        return self

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """(B, C, h, w) scaled latents z ~ q(z|x) of the batch's images or cached posteriors."""
        if "latent_mean" not in batch:
            return self.vae.encode(batch["image"]).float()
        mean, std = (
            batch["latent_mean"],
            batch["latent_std"],
        )  # the draw DiagonalGaussian.sample makes
        z = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.vae.scale_latents(z).float()

    def condition(self, batch: dict) -> torch.Tensor:
        """(B, L, D) text context after caption dropout: cached embeddings where the batch has
        them (the empty prompt's swapped in), else the text encoder on the kept captions."""
        keep = keep_mask(len(batch["caption"]), self.caption_dropout)
        if "context" in batch:
            if any(p.requires_grad for p in self.text_encoder.parameters()):
                raise ValueError(
                    "cached text embeddings cannot train the text encoder; freeze it "
                    "(text_encoder.frozen=true) or cache latents only"
                )
            context = batch["context"]
            keep = keep.to(context.device)[:, None, None]
            return torch.where(keep, context, batch["empty_context"].to(context)).float()
        return self.text_encoder([c if k else "" for c, k in zip(batch["caption"], keep.tolist())])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = self.latents(
            batch
        )  # drawn first, then the dropout mask: one order for every batch kind
        loss = self.objective(self.unet, latents, self.condition(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update(self.unet)

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Losses at fixed, evenly spread timesteps with fixed noise: the same points in every run.

        val/loss is in the run's own prediction space and weighting; val/mse_x0, val/mse_eps and
        val/loss_min_snr are in a common space, so they also compare eps with v runs."""
        images = batch["image"]
        g = torch.Generator(device=images.device).manual_seed(batch_idx)
        # The posterior sample too comes from g, not the global RNG (which a run's history sets).
        latents = self.vae.encode(images, generator=g).float()
        n, T = latents.shape[0], self.objective.schedule.num_steps
        t = (torch.arange(n, device=latents.device) * T // n).clamp(max=T - 1)
        eps = torch.randn(latents.shape, generator=g, device=latents.device)
        context = self.text_encoder(batch["caption"])
        losses = self.objective.evaluate(self.ema.shadow, latents, context, t=t, eps=eps)
        for name, value in losses.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=n)

    def export_parts(self) -> dict[str, nn.Module]:
        """What a weights file holds: the EMA U-Net (the one to sample from), VAE, text encoder."""
        return {"unet": self.ema.shadow, "vae": self.vae, "text_encoder": self.text_encoder}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
