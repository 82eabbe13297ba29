"""`LatentDiffusion`: the Lightning module training a U-Net in the latent space of a frozen VAE."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import lightning as L
import torch
from torch import nn

from ldm.checkpoints.files import CheckpointError
from ldm.config import ConfigError
from ldm.diffusion import conditioning
from ldm.diffusion.conditioning import Condition
from ldm.diffusion.objective import DiffusionObjective
from ldm.fingerprint import summary
from ldm.models.lora import LoRANetwork
from ldm.models.text_encoder import DualTextEncoder, TextEncoder
from ldm.models.unet import micro_conditioning
from ldm.pipeline import Pipeline
from ldm.precision import Precision
from ldm.training.ema import EMA
from ldm.training.options import Captions, EMASettings, LRSchedule, Speed
from ldm.training.trains import Full, Trains

log = logging.getLogger(__name__)
TRAINING_STATE = ("ema.", "unet_lora.", "text_lora.")  # kept in checkpoints whatever trains


def step_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """The generator of one training batch's random draws: a function of the run's seed and
    the batch's number alone, so a resumed run draws what the uninterrupted one did."""
    g = torch.Generator(device=device)
    return g.manual_seed(seed * 1_000_003 + batch)


def my_share(draw: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Rank `rank`'s rows of a draw made for the whole global batch (n rows a rank): each sample
    gets the same noise, timestep and dropout whatever the number of processes."""
    return draw[rank * n : (rank + 1) * n]


class LatentDiffusion(L.LightningModule):
    """Frozen VAE + U-Net + text encoder (trained or frozen) + an EMA of the U-Net.

    Batches are dicts {"image": (B, 3, H, W) in [-1, 1], "caption": list[str]}, or cached VAE
    posteriors {"latent_mean", "latent_std": (B, C, h, w), "caption"} with, from a cache made
    with the (frozen) text encoder, {"context": (B, L, D), "empty_context": (1, L, D)}; an
    SDXL-structured model (a `DualTextEncoder`) also reads each sample's micro-conditioning
    {"time_ids": (B, 6)} and, cached, the pooled vector {"pooled": (B, P)}.

    What trains is one choice, `trains` (ldm.training.trains: the full U-Net, LoRA / LoCon
    adapters, textual inversion); the other settings are small dataclasses
    (ldm.training.options): the `lr_schedule`, the `ema` (kept when the choice
    keeps one), `captions` (dropout, tag augmentation), `speed` (channels_last, compile,
    attention kernel). The U-Net's `use_checkpoint` trades compute for memory, and
    `text_encoder_device` ("cpu") keeps a frozen text encoder there whatever device the module
    moves to (with cached embeddings only the sample grids' prompts need it); its conditions are
    handed to the U-Net's device.

    Randomness: every draw of a training batch (posterior sample, timestep, noise, caption
    dropout) comes from `step_generator(seed, batch number)`, made for the global batch and
    sliced per rank: a resumed run repeats the uninterrupted one bit for bit, and N processes
    draw what one process with the same global batch draws.

    A batch whose gradients are not finite on any rank changes nothing on every rank (the flag
    is all-reduced; the optimizer step runs without gradients, so Lightning still counts it)
    and is counted (`train/nonfinite_steps`); `max_nonfinite_in_a_row` such batches stop the
    run with the last checkpoint intact.

    Lightning checkpoints hold what trains (and the EMA), not the frozen parts, which a resumed
    run takes from its configs / `init=` again: a fingerprint of them is stored and checked.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: TextEncoder,
        objective: DiffusionObjective,
        optimizer: Callable,
        trains: Trains | None = None,
        lr_schedule: LRSchedule | None = None,
        ema: EMASettings | None = None,
        captions: Captions | None = None,
        speed: Speed | None = None,
        seed: int = 0,
        max_nonfinite_in_a_row: int = 20,
        text_encoder_device: str | None = None,
    ) -> None:
        super().__init__()
        self.trains, self.lr_schedule = trains or Full(), lr_schedule or LRSchedule()
        self.captions, self.speed = captions or Captions(), speed or Speed()
        ema = ema or EMASettings()
        if self.speed.channels_last:  # NHWC convolutions (faster with tensor cores); EMA copies it
            unet.to(memory_format=torch.channels_last)
        # The compiled U-Net trains; kept outside the module's children, so the state dict
        # keeps the U-Net's own names (the compiled wrapper shares its parameters).
        object.__setattr__(self, "train_unet", torch.compile(unet) if self.speed.compile else unet)
        self.ema_every = ema.every
        self.seed, self.max_nonfinite_in_a_row = seed, max_nonfinite_in_a_row
        self.nonfinite_steps, self.nonfinite_in_a_row, self.calls = 0, 0, 0
        self.unet, self.text_encoder, self.objective = unet, text_encoder, objective
        self.vae = vae.requires_grad_(False).eval()  # frozen: no grad, no optimizer state
        self.trains.freeze(unet, text_encoder)
        self.new_word = self.trains.word
        if self.new_word:  # registered here (trains, is checkpointed), used by the text encoder
            self.word_vectors = nn.Parameter(self.trains.start(text_encoder))
            text_encoder.add_embedding(self.new_word, self.word_vectors)
        self.unet_lora, self.text_lora = self.trains.adapters(unet, text_encoder)
        keep = self.trains.keeps_ema and ema.decay
        if (
            ema.decay and not self.trains.keeps_ema
        ):  # said, so that a set model.ema is not lost unseen
            log.info(
                "no EMA: %s trains no full U-Net (model.ema unused)", type(self.trains).__name__
            )
        self.ema = EMA(unet, ema.decay, ema.device) if keep else None
        ignore = []  # parts kept on another device: DDP would broadcast them from its own
        if self.ema is not None and self.ema.offloaded:
            ignore += [f"ema.{k}" for k in self.ema.state_dict()]
        if text_encoder_device is not None:
            if text_encoder.trains:
                raise ConfigError(
                    f"model.text_encoder_device={text_encoder_device} keeps the text encoder "
                    f"apart from the U-Net, for a frozen one (cached embeddings, prompts of the "
                    f"sample grids); this one trains: set model.text_encoder_device=null"
                )
            text_encoder.pin(text_encoder_device)
            ignore += [f"text_encoder.{k}" for k in text_encoder.state_dict()]
        if ignore:
            self._ddp_params_and_buffers_to_ignore = ignore
        self.optimizer_factory = optimizer

    @contextlib.contextmanager
    def sampling_unet(self):
        """The U-Net to sample and validate with: the EMA, or the (adapted) U-Net itself. An EMA
        kept on another device (the CPU) is swapped into the U-Net for the block."""
        if self.ema is None:
            yield self.unet
        elif self.ema.offloaded and self.ema.device != next(self.unet.parameters()).device:
            was_training = self.unet.training
            with self.ema.swapped_into(self.unet.eval()) as unet:
                try:
                    yield unet
                finally:
                    self.unet.train(was_training)
        else:
            yield self.ema.shadow

    @contextlib.contextmanager
    def sampling_pipeline(self, precision: Precision | None = None):
        """A Pipeline over the sampling U-Net, the VAE and the text encoder (in eval mode for
        the block)."""
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        try:
            with self.sampling_unet() as unet:
                parts = (unet, self.vae, self.text_encoder, self.objective.schedule)
                yield Pipeline(*parts, self.objective.prediction, precision)
        finally:
            self.text_encoder.train(was_training)

    def setup(self, stage: str) -> None:
        """Refuse, before the first step, what the trainer's precision cannot train."""
        cast = str(self.trainer.precision) in ("bf16-true", "16-true")
        if cast and self.ema is not None:
            raise ConfigError(
                f"trainer.precision={self.trainer.precision} casts the EMA to half precision, "
                f"where an update of (1 - decay) of a step is lost to rounding: use "
                f"trainer.precision=bf16-mixed, or model.ema.decay=null (adapters keep none)"
            )

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.vae.eval()  # Lightning calls train() every epoch: keep the frozen parts in eval
        return self

    @torch.no_grad()
    def posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of q(z|x), each (B, C, h, w): from the VAE or the cached posteriors."""
        if "latent_mean" in batch:
            return batch["latent_mean"], batch["latent_std"]
        images = batch["image"]
        device = images.device.type
        # fp16 autocast: the VAE encoder's activations overflow float16; it runs in float32
        fp16 = (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        )
        with torch.autocast(device, enabled=False) if fp16 else contextlib.nullcontext():
            posterior = self.vae.posterior(images.float() if fp16 else images)
        return posterior.mean, posterior.std

    @torch.no_grad()
    def latents(self, batch: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) scaled latents z = mean + std * noise ~ q(z|x) of the batch."""
        mean, std = self.posterior(batch)
        if noise is None:
            noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.vae.scale_latents(mean + std * noise.to(mean)).float()

    def condition(
        self,
        batch: dict,
        keep: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Condition:
        """The U-Net's condition after caption dropout (`keep`: which captions survive, drawn
        here if not given): cached embeddings where the batch has them, else the text encoder
        on the kept captions. A dropped caption is the empty prompt's context for SD 1/2 and
        zeros for an SDXL-structured model (both towers' hidden states and the pooled vector,
        the sample's micro-conditioning kept), as each was trained and samples unconditionally."""
        if keep is None:
            keep = self.captions.keep(len(batch["caption"]))
        if "context" in batch:
            return self.cached_condition(batch, keep)
        cond = self.encode(self.captions.augment(batch["caption"], generator), keep, batch)
        return conditioning.to(cond, self.device)  # the text encoder may be kept elsewhere

    def encode(self, captions: list[str], keep: torch.Tensor, batch: dict) -> Condition:
        """The text encoder's condition of `captions`, those not kept dropped."""
        if isinstance(self.text_encoder, DualTextEncoder):
            return self.text_encoder.condition(captions, batch_time_ids(batch), drop=~keep)
        return self.text_encoder([c if k else "" for c, k in zip(captions, keep.tolist())])

    def cached_condition(self, batch: dict, keep: torch.Tensor) -> Condition:
        if self.text_encoder.trains:
            raise ValueError(
                "cached text embeddings cannot train the text encoder; freeze it "
                "(text_encoder.frozen=true) or cache latents only"
            )
        context = batch["context"]
        keep = keep.to(context.device)
        if "pooled" not in batch:
            dropped = batch["empty_context"].to(context)
            return torch.where(keep[:, None, None], context, dropped).float()
        pooled = torch.where(keep[:, None], batch["pooled"], 0.0).float()
        micro = micro_conditioning(batch_time_ids(batch).to(pooled.device))
        return {
            "context": torch.where(keep[:, None, None], context, 0.0).float(),
            "y": torch.cat([pooled, micro], dim=1),
        }

    def position(self) -> tuple[int, int, int]:
        """(number of this training batch in the run, rank, world size). Under a trainer the
        number is Lightning's batch count, which a resumed run restores; without one (a
        training step called directly) a counter of the calls."""
        if self._trainer is None:
            self.calls += 1
            return self.calls, 0, 1
        number = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        return number, self.global_rank, self.trainer.world_size

    def draws(self, n: int, latent_shape: torch.Size, device: torch.device) -> dict:
        """This rank's share of the global batch's draws (see the class doc)."""
        number, rank, world = self.position()
        g = step_generator(self.seed, number, device)
        shape = (n * world, *latent_shape[1:])
        posterior = torch.randn(shape, generator=g, device=device)
        t, eps, xi = self.objective.draw(shape, g, device)
        keep = self.captions.keep(n * world, g, device)
        parts = {"posterior": posterior, "t": t, "eps": eps, "xi": xi, "keep": keep.cpu()}
        out = {k: None if v is None else my_share(v, rank, n) for k, v in parts.items()}
        return {**out, "generator": g}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["caption"])
        mean, std = self.posterior(batch)
        d = self.draws(n, mean.shape, mean.device)
        latents = self.vae.scale_latents(mean + std * d["posterior"].to(mean)).float()
        context = self.condition(batch, d["keep"], d["generator"])
        if self.speed.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        with self.speed.attention():
            loss = self.objective(
                self.train_unet,
                latents,
                context,
                t=d["t"],
                eps=d["eps"],
                xi=d["xi"],
                sample_weight=batch.get("loss_weight"),
            )
        # Logged by every rank (sync_dist is a collective) and returned even when not finite
        # (Lightning's DDP cannot skip a step by returning None): its gradients are not finite
        # either, and on_before_optimizer_step skips the step.
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    # -- non-finite gradients: the step skipped on every rank alike --------------------------
    def all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether the tensors are finite on every rank (one all-reduce); counts the skips."""
        bad = sum(float(not torch.isfinite(t).all()) for t in tensors)
        flag = torch.tensor(bad, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        if float(flag) == 0:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), rank_zero_only=True)
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} batches in a row had a non-finite loss or gradient "
                f"(and were skipped); stopping. The last checkpoint holds the weights before "
                f"them: resume from it with a lower optim.lr, or check the data."
            )
        return False

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not self.all_finite(torch.nn.utils.get_total_norm(grads)):
            for group in optimizer.param_groups:  # an optimizer skips what has no gradient
                for p in group["params"]:
                    p.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        """After each optimizer step (not each accumulated batch), and before any callback sees
        the step (a checkpoint holds the EMA of every step it counts), the EMA follows the
        U-Net: every `ema_every`-th step, with the decay of that many steps."""
        super().optimizer_step(*args, **kwargs)
        step = self.trainer.global_step + 1  # Lightning counts the step once this returns
        if self.ema is not None and step % self.ema_every == 0:
            full = getattr(self.trainer.strategy, "full_params", None)  # FSDP: gather shards
            with full(self.unet) if full else contextlib.nullcontext():
                self.ema.update(self.unet, steps=self.ema_every)

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Losses at fixed, evenly spread timesteps with fixed noise: the same points in every run.

        val/loss is in the run's own prediction space and weighting; val/mse_x0, val/mse_eps and
        val/loss_min_snr are in a common space, so they also compare eps with v runs."""
        images = batch["image"]
        n, rank, world = images.shape[0], self.global_rank, self.trainer.world_size
        g = torch.Generator(device=images.device).manual_seed(batch_idx)
        # Drawn for the global batch (this rank's slice kept) from g, not the global RNG (which
        # a run's history sets): the same points whatever the number of processes.
        posterior = self.vae.posterior(images)
        shape = (n * world, *posterior.mean.shape[1:])
        z = torch.randn(shape, generator=g, device=images.device)
        eps = my_share(torch.randn(shape, generator=g, device=images.device), rank, n)
        latents = posterior.mean + posterior.std * my_share(z, rank, n).to(posterior.mean)
        latents = self.vae.scale_latents(latents).float()
        T = self.objective.schedule.num_steps
        t = (torch.arange(n * world, device=latents.device) * T // (n * world)).clamp(max=T - 1)
        t = my_share(t, rank, n)
        context = self.encode(batch["caption"], torch.ones(n, dtype=torch.bool), batch)
        with self.sampling_unet() as unet:
            losses = self.objective.evaluate(unet, latents, context, t=t, eps=eps)
        for name, value in losses.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=n, sync_dist=True)

    def export_parts(self) -> dict[str, nn.Module]:
        """What a weights file holds: the EMA U-Net (the one to sample from), VAE, text encoder."""
        unet = self.ema.shadow if self.ema is not None else self.unet
        return {"unet": unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def adapters(self) -> dict[str, LoRANetwork]:
        """The LoRA networks that train, by the part they adapt."""
        nets = {"unet": self.unet_lora, "text_encoder": self.text_lora}
        return {k: v for k, v in nets.items() if v is not None}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """One group, or two when the text encoder's parameters have their own `text_lr`."""
        params = self.trainable_parameters()
        text_lr = self.trains.text_lr
        if text_lr is None:
            return [{"params": params}]
        text = {
            id(p)
            for m in (self.text_encoder, self.text_lora)
            if m is not None
            for p in m.parameters()
        }
        return [
            {"params": [p for p in params if id(p) not in text]},
            {"params": [p for p in params if id(p) in text], "lr": text_lr},
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
        checkpoint["frozen_fingerprint"] = summary(state, frozen)
        checkpoint["prediction"] = self.objective.prediction.value
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a resume whose frozen parts are not the ones the checkpoint was made with, and
        fill in their tensors (a checkpoint leaves them out) from this module."""
        stored = checkpoint.get("frozen_fingerprint")
        own = self.state_dict()
        if stored is not None and stored != summary(own, set(stored)):
            raise CheckpointError(
                "the frozen parts (VAE, a LoRA's base, a frozen text encoder) differ "
                "from those the checkpoint was trained with: resume with the same "
                "init= weights and configs"
            )
        for k in self.frozen_keys(own):
            checkpoint["state_dict"].setdefault(k, own[k])
        check_same_model(checkpoint, own, self.objective.prediction.value)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameter_groups())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_schedule.factor())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def batch_time_ids(batch: dict) -> torch.Tensor:
    """The batch's (B, 6) SDXL micro-conditioning, which the data records per sample."""
    if "time_ids" not in batch:
        raise ValueError(
            "an SDXL-structured model (DualTextEncoder) needs each sample's time_ids (original "
            "size, crop, target size) in the batch; the shard and latent-cache readers record "
            "them: rebuild a latent cache written before they did"
        )
    return batch["time_ids"].float()


def check_same_model(checkpoint: dict, own: dict[str, torch.Tensor], prediction: str) -> None:
    """A clear error for a checkpoint of another architecture or objective (rather than
    Lightning's list of every mismatched tensor)."""
    theirs = checkpoint["state_dict"]
    unexpected = [k for k in theirs if k not in own]
    missing = [k for k in own if k not in theirs]
    reshaped = [k for k in own if k in theirs and theirs[k].shape != own[k].shape]
    stored = checkpoint.get("prediction", prediction)
    if unexpected or missing or reshaped or stored != prediction:
        problems = [
            f"{len(missing)} tensors it lacks (e.g. {missing[:2]})" if missing else "",
            f"{len(unexpected)} tensors this model does not have (e.g. {unexpected[:2]})"
            if unexpected
            else "",
            f"{len(reshaped)} of another shape (e.g. {reshaped[:2]})" if reshaped else "",
            f"trained for {stored!r} prediction, configured {prediction!r}"
            if stored != prediction
            else "",
        ]
        raise CheckpointError(
            "the checkpoint is of another model or config: "
            + "; ".join(p for p in problems if p)
            + ". Resume with the configs it was trained with (its run's .hydra/config.yaml)."
        )
