"""What the denoising network is conditioned on, as one value the objective, guidance and
samplers pass along without looking inside.

A condition is the text context (B, L, D) alone (SD 1/2), or a dict of the network's keyword
arguments batched along dim 0: `{"context": (B, L, D), "y": (B, adm_in_channels)}` for SDXL,
whose U-Net also takes a vector (the pooled text embedding and the micro-conditioning).
"""

from __future__ import annotations

from typing import Callable

import torch

Condition = torch.Tensor | dict[str, torch.Tensor]
ModelFn = Callable[..., torch.Tensor]  # model(x, t, context[, y=...]) -> prediction


def apply(model: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
    """`model(x, t, context)`, or `model(x, t, **cond)` for a dict condition."""
    return model(x, t, **cond) if isinstance(cond, dict) else model(x, t, cond)


def cat(conds: list[Condition]) -> Condition:
    """Conditions stacked along the batch (classifier-free guidance's cond and uncond rows)."""
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def context_of(cond: Condition) -> torch.Tensor:
    """The per-token text context (B, L, D) of a condition."""
    return cond["context"] if isinstance(cond, dict) else cond


def batch_size(cond: Condition) -> int:
    return context_of(cond).shape[0]


def rows(cond: Condition, index) -> Condition:
    """Some rows of a condition (`index`: a slice or indices along the batch)."""
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


def to(cond: Condition, device: torch.device) -> Condition:
    """A condition on `device` (a text encoder may be kept on another one)."""
    if isinstance(cond, dict):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)
