"""`LatentDiffusion`: the Lightning module training a U-Net in the latent space of a frozen VAE."""

from __future__ import annotations

import math
from typing import Callable

import lightning as L
import torch
from torch import nn

from ldm.checkpoints.files import CheckpointError
from ldm.diffusion.objective import DiffusionObjective
from ldm.models.lora import LoRANetwork
from ldm.models.text_encoder import TextEncoder
from ldm.training.ema import EMA

TRAINING_STATE = ("ema.", "unet_lora.", "text_lora.")  # kept in checkpoints whatever trains


def keep_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool: which captions survive caption dropout with probability p. Dropped ones become
    the empty prompt, which teaches the unconditional model classifier-free guidance needs."""
    return torch.rand(n, generator=generator) >= p


def augment_tags(caption: str, shuffle: bool, keep_first: int, dropout: float) -> str:
    """Tag-style captions ("tag, tag, tag"): drop each tag after the first `keep_first` with
    probability `dropout`, and shuffle those (kohya's shuffle_caption / keep_tokens /
    caption_tag_dropout_rate); the first tags (e.g. a trigger word) stay in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_first], tags[keep_first:]
    if dropout:
        tail = [t for t in tail if torch.rand(()) >= dropout]
    if shuffle and len(tail) > 1:
        tail = [tail[i] for i in torch.randperm(len(tail)).tolist()]
    return ", ".join(t for t in head + tail if t)


def warmup_lambda(warmup_steps: int, decay_steps: int | None = None) -> Callable[[int], float]:
    """Linear learning-rate warmup from 0, then constant, or with `decay_steps` a cosine decay
    to 0 at that step (a short fine-tune at a high rate ends on settled weights)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        if decay_steps is None or step < warmup_steps:
            return warm
        done = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


class LatentDiffusion(L.LightningModule):
    """Frozen VAE + trainable U-Net + text encoder (trained or frozen) + an EMA of the U-Net.

    Batches are dicts {"image": (B, 3, H, W) in [-1, 1], "caption": list[str]}, or cached VAE
    posteriors {"latent_mean", "latent_std": (B, C, h, w), "caption"} with, from a cache made
    with the (frozen) text encoder, {"context": (B, L, D), "empty_context": (1, L, D)}.

    Textual inversion: `new_word` (e.g. "<pastel>") gets `new_word_vectors` vectors, started
    from the token embeddings of `new_word_init`; only they train.

    Tag-style captions: `tag_shuffle`, `tag_keep_first`, `tag_dropout` (see `augment_tags`).

    LoRA: `lora` (and `text_lora`) build adapters for the U-Net (and text encoder), e.g. a
    `configs/lora_preset/*.yaml` preset; the adapted models are then frozen and only the
    adapters train (no EMA: `ema_decay=None`). `text_lr` gives the text encoder's parameters
    (its adapters, or itself when it trains) their own learning rate. Lightning checkpoints
    hold what trains (and the EMA), not the frozen parts, which a resumed run takes from its
    configs / `init=` again: a fingerprint of them is stored and checked.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: TextEncoder,
        objective: DiffusionObjective,
        optimizer: Callable,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        caption_dropout: float = 0.1,
        ema_decay: float | None = 0.999,
        lora: Callable[[nn.Module], LoRANetwork] | None = None,
        text_lora: Callable[[nn.Module], LoRANetwork] | None = None,
        text_lr: float | None = None,
        new_word: str | None = None,
        new_word_vectors: int = 1,
        new_word_init: str = "*",
        tag_shuffle: bool = False,
        tag_keep_first: int = 0,
        tag_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.objective = unet, text_encoder, objective
        self.vae = vae.requires_grad_(False).eval()  # frozen: no grad, no optimizer state
        if (lora or text_lora or new_word) and ema_decay:
            raise ValueError("LoRA and textual inversion keep no EMA: set model.ema_decay=null")
        self.unet_lora = self.text_lora = None
        if lora or text_lora or new_word:  # only the adapters (or the new word) train
            unet.requires_grad_(False)
            text_encoder.requires_grad_(False)
        self.new_word = new_word
        if new_word:  # registered here (trains, is checkpointed), used by the text encoder
            self.word_vectors = nn.Parameter(self._init_vectors(new_word_init, new_word_vectors))
            text_encoder.add_embedding(new_word, self.word_vectors)
        self.tags = (tag_shuffle, tag_keep_first, tag_dropout)
        if lora is not None:
            self.unet_lora = lora(unet).attach()
        if text_lora is not None:
            self.text_lora = text_lora(text_encoder).attach()
        self.ema = EMA(unet, ema_decay) if ema_decay else None
        self.optimizer_factory, self.text_lr = optimizer, text_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.caption_dropout = caption_dropout

    @torch.no_grad()
    def _init_vectors(self, text: str, n: int) -> torch.Tensor:
        """(n, width): the mean token embedding of `text`, n times (textual inversion's start)."""
        ids = torch.tensor(self.text_encoder.tokenizer.encode(text) or [0])
        return self.text_encoder.model.token_embedding(ids).mean(0).repeat(n, 1)

    @property
    def sampling_unet(self) -> nn.Module:
        """The U-Net to sample and validate with: the EMA, or the (adapted) U-Net itself."""
        return self.ema.shadow if self.ema is not None else self.unet

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.vae.eval()  # Lightning calls train() every epoch: keep the frozen parts in eval
        return self

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """(B, C, h, w) scaled latents z ~ q(z|x) of the batch's images or cached posteriors."""
        if "latent_mean" not in batch:
            return self.vae.encode(batch["image"]).float()
        mean, std = batch["latent_mean"], batch["latent_std"]
        # the draw DiagonalGaussian.sample makes, from the same generator state
        z = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.vae.scale_latents(z).float()

    def condition(self, batch: dict) -> torch.Tensor:
        """(B, L, D) text context after caption dropout: cached embeddings where the batch has
        them (the empty prompt's swapped in), else the text encoder on the kept captions."""
        keep = keep_mask(len(batch["caption"]), self.caption_dropout)
        if "context" in batch:
            if self.text_encoder.trains:
                raise ValueError(
                    "cached text embeddings cannot train the text encoder; freeze it "
                    "(text_encoder.frozen=true) or cache latents only"
                )
            context = batch["context"]
            keep = keep.to(context.device)[:, None, None]
            return torch.where(keep, context, batch["empty_context"].to(context)).float()
        captions = batch["caption"]
        if self.tags[0] or self.tags[2]:  # shuffle or drop tags
            captions = [augment_tags(c, *self.tags) for c in captions]
        return self.text_encoder([c if k else "" for c, k in zip(captions, keep.tolist())])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # latents drawn first, then the dropout mask: one order for every kind of batch
        latents = self.latents(batch)
        loss = self.objective(
            self.unet, latents, self.condition(batch), sample_weight=batch.get("loss_weight")
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
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
        losses = self.objective.evaluate(self.sampling_unet, latents, context, t=t, eps=eps)
        for name, value in losses.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=n)

    def export_parts(self) -> dict[str, nn.Module]:
        """What a weights file holds: the EMA U-Net (the one to sample from), VAE, text encoder."""
        return {"unet": self.sampling_unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def adapters(self) -> dict[str, LoRANetwork]:
        """The LoRA networks that train, by the part they adapt."""
        nets = {"unet": self.unet_lora, "text_encoder": self.text_lora}
        return {k: v for k, v in nets.items() if v is not None}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """One group, or two when the text encoder's parameters have their own `text_lr`."""
        params = self.trainable_parameters()
        if self.text_lr is None:
            return [{"params": params}]
        text = {
            id(p)
            for m in (self.text_encoder, self.text_lora)
            if m is not None
            for p in m.parameters()
        }
        return [
            {"params": [p for p in params if id(p) not in text]},
            {"params": [p for p in params if id(p) in text], "lr": self.text_lr},
        ]

    # -- checkpoints: what trains, not the frozen parts ------------------------------------
    def frozen_keys(self, state: dict[str, torch.Tensor]) -> set[str]:
        """State-dict keys of what does not train: parameters without a gradient and the
        buffers of frozen parts (adapters and the EMA always count as training state)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k for k in state if k not in trainable and not k.startswith(TRAINING_STATE)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        frozen = self.frozen_keys(state)
        checkpoint["frozen_fingerprint"] = fingerprint(state, frozen)
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a resume whose frozen parts are not the ones the checkpoint was made with, and
        fill in their tensors (a checkpoint leaves them out) from this module."""
        stored = checkpoint.get("frozen_fingerprint")
        own = self.state_dict()
        if stored is not None and stored != fingerprint(own, set(stored)):
            raise CheckpointError(
                "the frozen parts (VAE, a LoRA's base, a frozen text encoder) differ "
                "from those the checkpoint was trained with: resume with the same "
                "init= weights and configs"
            )
        for k, v in own.items():
            checkpoint["state_dict"].setdefault(k, v)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameter_groups())
        schedule = warmup_lambda(self.warmup_steps, self.decay_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fingerprint(state: dict[str, torch.Tensor], keys: set[str]) -> dict[str, list]:
    """A cheap identity of some tensors: shape and float64 sum of each (a missing one: None)."""
    return {
        k: [list(state[k].shape), float(state[k].double().sum())] if k in state else None
        for k in sorted(keys)
        if k not in state or state[k].is_floating_point()
    }
