"""Lightning precision plugins under which every precision trains with a fused optimizer and
gradient clipping.

Lightning's own plugins refuse to clip for an optimizer that can unscale inside its step (fused
AdamW, the default here): in bf16-mixed, where nothing is scaled, as much as in 16-mixed, where
they also leave its gradients scaled. torch's GradScaler supports the order every other
optimizer gets: `unscale_` (which records whether a gradient overflowed), clip, then `step`,
which hands the fused kernel the recorded `found_inf` and no second scale, and skips the update
on an overflow. These plugins take that order for every optimizer, so clipping always sees
unscaled gradients. Lightning's FSDP plugin also refuses norm clipping (a local norm is wrong
for sharded gradients); the FSDP one here asks the root FSDP module, which reduces the norm
over the ranks.

`precision_plugin` picks the plugin a run needs: one of these for mixed precision or FSDP,
Lightning's own (None: pass the precision string) for 32-true and the "-true" casts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

MIXED = ("16-mixed", "bf16-mixed")


def scaled_optimizer_step(plugin, optimizer, model, closure: Callable[[], Any], **kwargs) -> Any:
    """Lightning's scaled step, with the gradients unscaled for every optimizer before the
    `on_before_optimizer_step` hooks and clipping (`plugin._after_closure`)."""
    closure_result = closure()
    skipped_backward = closure_result is None and model.automatic_optimization
    if skipped_backward:
        plugin._after_closure(model, optimizer)
        return closure_result
    plugin.scaler.unscale_(optimizer)
    plugin._after_closure(model, optimizer)
    output = plugin.scaler.step(optimizer, **kwargs)  # skipped when unscale_ found inf/NaN
    plugin.scaler.update()
    return output


class UnscaleThenClip:
    """The step and clipping both plugins share: unscale for every optimizer, then clip."""

    def optimizer_step(self, optimizer, model, closure, **kwargs) -> Any:
        if self.scaler is None:  # bf16 or float32: nothing to unscale
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        return scaled_optimizer_step(self, optimizer, model, closure, **kwargs)

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


class ClippingMixedPrecision(UnscaleThenClip, MixedPrecision):
    """Autocast to bf16 or fp16 (with loss scaling), on CUDA or the CPU, clipping allowed with
    a fused optimizer. On a CPU, 16-mixed is fp16 with a CPU GradScaler (Lightning's own plugin
    silently swaps it for bf16)."""


class ClippingFSDPPrecision(UnscaleThenClip, FSDPPrecision):
    """Lightning's FSDP precision with the unscale-then-clip order above and norm clipping by
    the root FSDP module (`root`, set by the strategy once it has wrapped the model)."""

    root: torch.nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(self.root, FSDP):  # nothing wrapped (one process): a plain norm
            return super(FSDPPrecision, self).clip_grad_by_norm(optimizer, clip_val)
        self.root.clip_grad_norm_(clip_val)


def precision_plugin(value: str, device: str, fsdp: bool = False) -> Precision | None:
    """The plugin for precision `value` on `device` ("cpu"/"cuda"), or None where Lightning's
    own plugin for the precision string already clips correctly."""
    if fsdp:
        return ClippingFSDPPrecision(value)
    if value in MIXED:
        return ClippingMixedPrecision(value, device)
    return None
