"""Exponential moving average of a model's weights, used for sampling and export."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of `model` whose weights track an exponential moving average.

    The effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so the average is
    useful from the first steps of a short run instead of being dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

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
        torch._foreach_lerp_(ema_params, params, weight)
        for e, b in zip(self.shadow.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1
