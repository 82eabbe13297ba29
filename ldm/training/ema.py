"""Exponential moving average of a model's weights, used for sampling and export."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ldm.models.placement import Pinnable


class EMA(Pinnable):
    """A frozen copy of `model` whose weights track an exponential moving average.

    The effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so the average is
    useful from the first steps of a short run instead of being dominated by the initial weights.

    `device="cpu"` keeps the average in host memory whatever device the model moves to (an SD
    U-Net's EMA is 3.4 GB of accelerator memory in float32): updates copy the weights over one
    tensor at a time, and `swapped_into` lends the average to the model for sampling.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, device: str | None = None) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.pin(device or None)

    @property
    def device(self) -> torch.device | None:
        """Where the average is kept apart from the model (None: with it)."""
        return self.pinned

    @property
    def offloaded(self) -> bool:
        return self.pinned is not None

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)  # the average is never in training mode

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """One update, standing for `steps` optimizer steps (the decay raised to that power)."""
        weight = 1.0 - self.current_decay() ** steps
        ema_params = list(self.shadow.parameters())
        params = [p.detach() for p in model.parameters()]
        if self.offloaded:  # a tensor at a time: no second full copy in either memory
            for e, p in zip(ema_params, params):
                e.lerp_(p.to(e.device), weight)
        else:
            torch._foreach_lerp_(ema_params, params, weight)
        for e, b in zip(self.shadow.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        for e, p in zip(self.shadow.parameters(), model.parameters()):
            kept = p.detach().to(e.device, copy=True)
            p.copy_(e)
            e.copy_(kept)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        """`model` holds the average inside the block and its own weights again after it (bit
        for bit: both swaps are copies); the average's memory holds the model's meanwhile."""
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)
