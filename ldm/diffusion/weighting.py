"""Per-sample loss weights as functions of the signal-to-noise ratio
SNR = alpha_bar / (1 - alpha_bar).

A weighting is `weight(snr, prediction, gamma) -> (B,)` tensor, multiplying each sample's mean
squared error in the space the network predicts in (`prediction` is a `Prediction`). To add
one, write such a function and
decorate it with `@register("name")`; it is then selectable as `diffusion.weighting=name`.

Every weight here is finite for SNR in [0, inf), so zero-terminal-SNR schedules (SNR = 0 at the
last step) never produce NaN.
"""

from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.prediction import Prediction

WeightFn = Callable[[torch.Tensor, Prediction, float], torch.Tensor]
WEIGHTINGS: dict[str, WeightFn] = {}


def register(name: str) -> Callable[[WeightFn], WeightFn]:
    def add(fn: WeightFn) -> WeightFn:
        WEIGHTINGS[name] = fn
        return fn

    return add


def snr_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """alpha_bar / (1 - alpha_bar); 0 where alpha_bar = 0 (a discrete schedule never reaches 1)."""
    alpha_bar = alpha_bar.double()
    return (alpha_bar / (1 - alpha_bar)).float()


@register("uniform")
def uniform(snr: torch.Tensor, prediction: Prediction, gamma: float = 5.0) -> torch.Tensor:
    """Plain MSE in the prediction's own space (Ho et al., 2020, "L_simple" for eps)."""
    return torch.ones_like(snr)


@register("min_snr")
def min_snr(snr: torch.Tensor, prediction: Prediction, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al., 2023), in the prediction's own space (`min_snr_weight`)."""
    return Prediction.parse(prediction).min_snr_weight(snr, gamma)


def get_weighting(name: str) -> WeightFn:
    if name not in WEIGHTINGS:
        raise ValueError(
            f"unknown loss weighting {name!r}; choose one of {sorted(WEIGHTINGS)} "
            "or add one with ldm.diffusion.weighting.register"
        )
    return WEIGHTINGS[name]
