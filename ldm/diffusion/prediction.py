"""What the network predicts: eps, v or x0, as one type that owns everything that depends on it.

For x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps the network may predict eps, x0, or
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho, 2022). A `Prediction` gives the
training target, the (x0, eps) an output implies (all samplers need), the Min-SNR weight in its
own space, its names in other tools (diffusers' `prediction_type`, the LDM configs'
`parameterization`, the model spec's `prediction_type`) and whether a schedule can be sampled
with it. Outside names are parsed into it once, where they enter (`Prediction.parse`).
"""

from __future__ import annotations

import enum

import torch


def broadcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) shaped to multiply x (B, ...)."""
    return a.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Prediction(str, enum.Enum):
    """A str enum: configs, JSON metadata and comparisons see "eps", "v" or "x0"."""

    EPS = "eps"
    V = "v"
    X0 = "x0"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | Prediction) -> Prediction:
        """Our name or any outside one (epsilon, v_prediction, sample, ...), case-insensitive."""
        key = str(name.value if isinstance(name, Prediction) else name).lower()
        if key not in _ALIASES:
            raise ValueError(
                f"unknown prediction type {name!r}; choose eps, v or x0 "
                f"(or diffusers' epsilon, v_prediction, sample)"
            )
        return _ALIASES[key]

    @property
    def diffusers_name(self) -> str:
        """diffusers' scheduler `prediction_type`."""
        return {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[self.value]

    @property
    def modelspec_name(self) -> str:
        """The Stability model spec's `modelspec.prediction_type` (A1111/ComfyUI read it)."""
        return {"eps": "epsilon", "v": "v", "x0": "sample"}[self.value]

    @property
    def ldm_name(self) -> str:
        """The original LDM configs' `parameterization`."""
        return self.value

    def target(self, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The training target for (x0, eps) at noise level alpha_bar (B,)."""
        if self is Prediction.EPS:
            return eps
        if self is Prediction.X0:
            return x0
        a = broadcast(alpha_bar, x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def to_x0_eps(
        self, out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a network output `out` at x_t."""
        a = broadcast(alpha_bar, x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if self is Prediction.EPS:
            return (x_t - s1a * out) / sa, out
        if self is Prediction.X0:
            return out, (x_t - sa * out) / s1a
        return sa * x_t - s1a * out, s1a * x_t + sa * out

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al., 2023): the x0-space loss weighted by min(SNR, gamma),
        written for a loss in this prediction's space; finite for SNR in [0, inf).

        eps: ||eps_err||^2 = SNR ||x0_err||^2, so min(SNR, gamma) / SNR = min(1, gamma / SNR),
        which tends to 1 as SNR -> 0 (the value taken at SNR = 0).
        v:   ||v_err||^2 = (SNR + 1) ||x0_err||^2, so min(SNR, gamma) / (SNR + 1).
        x0:  min(SNR, gamma).
        """
        if self is Prediction.EPS:
            return (gamma / snr).clamp(max=1.0)
        clipped = snr.clamp(max=gamma)
        return clipped / (snr + 1) if self is Prediction.V else clipped

    def check_schedule(self, final_alpha_bar: float) -> None:
        """Refuse a schedule this prediction cannot be sampled on."""
        if self is Prediction.EPS and final_alpha_bar == 0.0:
            # At SNR 0 the input is pure noise, so predicting the noise says nothing about x0:
            # every sampler's first step would divide by sqrt(alpha_bar) = 0 (Lin et al., 2023,
            # Sec. 3.2).
            raise ValueError(
                "eps prediction cannot be sampled on a zero-terminal-SNR schedule; "
                "use diffusion.prediction=v (or x0), or set "
                "diffusion.schedule.zero_terminal_snr=false"
            )


_ALIASES = {
    "eps": Prediction.EPS,
    "epsilon": Prediction.EPS,
    "v": Prediction.V,
    "v_prediction": Prediction.V,
    "v-prediction": Prediction.V,
    "x0": Prediction.X0,
    "sample": Prediction.X0,
}
