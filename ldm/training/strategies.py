"""FSDP for the latent diffusion module: the U-Net sharded block by block, the frozen parts
(VAE, a frozen text encoder) and the EMA left whole on every rank and out of the optimizer."""

from __future__ import annotations

import contextlib

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from ldm.config import ConfigError
from ldm.models.attention import BasicTransformerBlock
from ldm.models.unet import ResBlock
from ldm.training.amp import ClippingFSDPPrecision


class UNetFSDP(FSDPStrategy):
    """Lightning's FSDP strategy wrapping each U-Net residual and transformer block.

    `sharding_strategy`: FULL_SHARD (parameters, gradients, optimizer state) or SHARD_GRAD_OP
    (gradients and optimizer state). `full_params` gathers a module's parameters, for the EMA.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("auto_wrap_policy", {ResBlock, BasicTransformerBlock})
        kwargs.setdefault("use_orig_params", True)  # frozen and trainable tensors side by side
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        lm = self.lightning_module
        ema = getattr(lm, "ema", None)
        if ema is not None and ema.offloaded:
            raise ConfigError(
                "model.ema.device=cpu works on one device and with DDP, not with FSDP: the "
                "U-Net's weights are sharded, so the EMA cannot be swapped in to sample. Drop "
                "it (FSDP keeps the EMA whole on each GPU) or thin its updates: model.ema.every."
            )
        whole = [lm.vae, ema]
        if not lm.text_encoder.trains:
            whole.append(lm.text_encoder)
        self.kwargs["ignored_modules"] = [m for m in whole if m is not None]
        wrapped = super()._setup_model(model)
        if isinstance(self.precision_plugin, ClippingFSDPPrecision):  # clips through the root
            self.precision_plugin.root = wrapped
        return wrapped

    def full_params(self, module: nn.Module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not any(isinstance(m, FSDP) for m in self.model.modules()):
            return contextlib.nullcontext()
        return FSDP.summon_full_params(self.model, writeback=False, recurse=True)
